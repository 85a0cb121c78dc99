// Command fastbackend is a TF Serving stand-in for the data-plane benchmark (bench/data_plane.py):
// it implements just enough of TF Serving for a tfscache node (and the original TFServingCache)
// to drive it, and answers predictions at once with a fixed small reply, so that what a
// benchmark measures is the proxy in front of it, not the model server.
//
//	gRPC  tensorflow.serving.ModelService/HandleReloadConfigRequest  (the whole list; models
//	      left out END; the call waits for new names to be AVAILABLE, as TF Serving's does)
//	      tensorflow.serving.ModelService/GetModelStatus
//	      tensorflow.serving.PredictionService/Predict  (fixed PredictResponse with model_spec)
//	REST  POST /v1/models/<name>[/versions/N]:predict   {"predictions": [2.5, 3.0, 4.5]}
//	      (with -echo-prefix P, models named P... answer with the request's body: large replies)
//	      GET  /v1/models/<name>[/versions/N]           status JSON
//	      GET  /fastbackend/counters                    requests per kind, loads, unloads
//
// It prints {"grpc_port": G, "rest_port": R, "pid": P} on one stdout line once both ports
// listen (bind port 0 to let the kernel choose). Models are never read from disk, except
// that a "latest"/"all" version policy lists base_path's numeric directories.
// Messages are hand-encoded with protowire: a handful of fields, no generated TF Serving code.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"tfscache.bench/fastbackend/rawcodec"
)

const (
	stateStart     = 10
	stateLoading   = 20
	stateAvailable = 30
	stateEnd       = 50

	methodPredict = "/tensorflow.serving.PredictionService/Predict"
	methodStatus  = "/tensorflow.serving.ModelService/GetModelStatus"
	methodReload  = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"
)

var stateNames = map[int]string{0: "UNKNOWN", stateStart: "START", stateLoading: "LOADING",
	stateAvailable: "AVAILABLE", 40: "UNLOADING", stateEnd: "END"}

// the fixed answer: half_plus_two of [1, 2, 5]
var outputs = []float32{2.5, 3.0, 4.5}

const restPredictBody = `{"predictions": [2.5, 3.0, 4.5]}`

type version struct {
	state     int
	ready     chan struct{} // closed once this attempt is AVAILABLE or END
	readyDone bool
	predict   []byte // the gRPC PredictResponse, encoded once per load
}

func (v *version) settle(state int) {
	v.state = state
	if !v.readyDone {
		v.readyDone = true
		close(v.ready)
	}
}

type model struct {
	configured bool
	versions   map[int64]*version
}

type counters struct {
	GrpcPredict, GrpcStatus, GrpcReload, GrpcOther, RestPredict, RestStatus, RestOther atomic.Int64
	Loads, Unloads                                                                     atomic.Int64
}

type server struct {
	mu       sync.RWMutex
	models   map[string]*model
	reloadMu sync.Mutex // TF Serving serialises reloads
	n        counters

	loadDelay       time.Duration
	slowPrefix      string
	echoPrefix      string
	slowDelay       time.Duration
	signatureName   string
	outputTensorKey string
}

// -- protobuf, by hand ---------------------------------------------------------------------

type modelSpec struct {
	name       string
	version    int64
	hasVersion bool
	label      string
}

// fields calls fn for each top-level field of msg; false on malformed input.
func fields(msg []byte, fn func(num protowire.Number, typ protowire.Type, val []byte, v uint64)) bool {
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return false
		}
		msg = msg[n:]
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(msg)
			if m < 0 {
				return false
			}
			fn(num, typ, nil, v)
			msg = msg[m:]
		case protowire.BytesType:
			b, m := protowire.ConsumeBytes(msg)
			if m < 0 {
				return false
			}
			fn(num, typ, b, 0)
			msg = msg[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, msg)
			if m < 0 {
				return false
			}
			msg = msg[m:]
		}
	}
	return true
}

// parseModelSpec reads field 1 of a request; repeated occurrences merge, as protobuf's do (a
// proxy may append a second model_spec carrying only the version).
func parseModelSpec(req []byte) (modelSpec, bool) {
	var spec modelSpec
	ok := fields(req, func(num protowire.Number, typ protowire.Type, val []byte, _ uint64) {
		if num != 1 || typ != protowire.BytesType {
			return
		}
		fields(val, func(num protowire.Number, typ protowire.Type, val []byte, _ uint64) {
			switch {
			case num == 1 && typ == protowire.BytesType:
				spec.name = string(val)
			case num == 2 && typ == protowire.BytesType: // google.protobuf.Int64Value{value = 1}
				spec.hasVersion, spec.label, spec.version = true, "", 0
				fields(val, func(num protowire.Number, typ protowire.Type, _ []byte, v uint64) {
					if num == 1 && typ == protowire.VarintType {
						spec.version = int64(v)
					}
				})
			case num == 4 && typ == protowire.BytesType:
				spec.label, spec.hasVersion = string(val), false
			}
		})
	})
	return spec, ok
}

func encodeModelSpec(name string, ver int64, signature string) []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendString(b, name)
	var iv []byte
	iv = protowire.AppendTag(iv, 1, protowire.VarintType)
	iv = protowire.AppendVarint(iv, uint64(ver))
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	b = protowire.AppendBytes(b, iv)
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	return protowire.AppendString(b, signature)
}

// PredictResponse{outputs = 1 map<string, TensorProto>, model_spec = 2}
func (s *server) encodePredictResponse(name string, ver int64) []byte {
	var tensor []byte
	tensor = protowire.AppendTag(tensor, 1, protowire.VarintType) // dtype DT_FLOAT
	tensor = protowire.AppendVarint(tensor, 1)
	var dim, shape []byte
	dim = protowire.AppendTag(dim, 1, protowire.VarintType)
	dim = protowire.AppendVarint(dim, uint64(len(outputs)))
	shape = protowire.AppendTag(shape, 2, protowire.BytesType)
	shape = protowire.AppendBytes(shape, dim)
	tensor = protowire.AppendTag(tensor, 2, protowire.BytesType)
	tensor = protowire.AppendBytes(tensor, shape)
	var floats []byte
	for _, f := range outputs {
		floats = protowire.AppendFixed32(floats, math.Float32bits(f))
	}
	tensor = protowire.AppendTag(tensor, 5, protowire.BytesType) // float_val, packed
	tensor = protowire.AppendBytes(tensor, floats)
	var entry []byte
	entry = protowire.AppendTag(entry, 1, protowire.BytesType)
	entry = protowire.AppendString(entry, s.outputTensorKey)
	entry = protowire.AppendTag(entry, 2, protowire.BytesType)
	entry = protowire.AppendBytes(entry, tensor)
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendBytes(b, entry)
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	return protowire.AppendBytes(b, encodeModelSpec(name, ver, s.signatureName))
}

// ModelVersionStatus{version = 1, state = 2, status = 3 StatusProto{} (OK)}
func encodeVersionStatus(ver int64, state int) []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(ver))
	b = protowire.AppendTag(b, 2, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(state))
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	return protowire.AppendBytes(b, nil)
}

type modelConfig struct {
	name, basePath string
	policy         string // "latest" (default), "all", "specific"
	numVersions    int
	versions       []int64
}

// ReloadConfigRequest{config = 1 ModelServerConfig{model_config_list = 1 ModelConfigList{
// config = 1 repeated ModelConfig{name = 1, base_path = 2, model_version_policy = 7}}}}
func parseReload(req []byte) ([]modelConfig, bool) {
	var out []modelConfig
	ok := true
	sub := func(msg []byte, num protowire.Number, fn func([]byte)) {
		if !fields(msg, func(n protowire.Number, typ protowire.Type, val []byte, _ uint64) {
			if n == num && typ == protowire.BytesType {
				fn(val)
			}
		}) {
			ok = false
		}
	}
	sub(req, 1, func(cfg []byte) {
		sub(cfg, 1, func(list []byte) {
			sub(list, 1, func(mc []byte) {
				c := modelConfig{policy: "latest", numVersions: 1}
				fields(mc, func(n protowire.Number, typ protowire.Type, val []byte, _ uint64) {
					switch {
					case n == 1 && typ == protowire.BytesType:
						c.name = string(val)
					case n == 2 && typ == protowire.BytesType:
						c.basePath = string(val)
					case n == 7 && typ == protowire.BytesType:
						fields(val, func(n protowire.Number, typ protowire.Type, val []byte, _ uint64) {
							switch n {
							case 100:
								c.policy = "latest"
								fields(val, func(n protowire.Number, _ protowire.Type, _ []byte, v uint64) {
									if n == 1 && v > 0 {
										c.numVersions = int(v)
									}
								})
							case 101:
								c.policy = "all"
							case 102:
								c.policy = "specific"
								fields(val, func(n protowire.Number, typ protowire.Type, val []byte, v uint64) {
									if n != 1 {
										return
									}
									if typ == protowire.VarintType {
										c.versions = append(c.versions, int64(v))
										return
									}
									for len(val) > 0 { // packed
										x, m := protowire.ConsumeVarint(val)
										if m < 0 {
											return
										}
										c.versions = append(c.versions, int64(x))
										val = val[m:]
									}
								})
							}
						})
					}
				})
				out = append(out, c)
			})
		})
	})
	return out, ok
}

// versionsOf lists base_path's numeric directories for the latest/all policies.
func (c modelConfig) versionsOf() []int64 {
	if c.policy == "specific" {
		return c.versions
	}
	entries, err := os.ReadDir(c.basePath)
	if err != nil {
		return nil
	}
	var vs []int64
	for _, e := range entries {
		if v, err := strconv.ParseInt(e.Name(), 10, 64); err == nil && e.IsDir() {
			vs = append(vs, v)
		}
	}
	sort.Slice(vs, func(i, j int) bool { return vs[i] > vs[j] })
	if c.policy == "latest" && len(vs) > c.numVersions {
		vs = vs[:c.numVersions]
	}
	return vs
}

// -- the model list --------------------------------------------------------------------------

func (s *server) delayFor(name string) time.Duration {
	if s.slowPrefix != "" && strings.HasPrefix(name, s.slowPrefix) {
		return s.slowDelay
	}
	return s.loadDelay
}

// startLoad makes a new attempt at name/ver; s.mu is held.
func (s *server) startLoad(m *model, name string, ver int64) *version {
	v := &version{state: stateLoading, ready: make(chan struct{})}
	m.versions[ver] = v
	s.n.Loads.Add(1)
	finish := func() {
		v.predict = s.encodePredictResponse(name, ver)
		v.settle(stateAvailable)
	}
	delay := s.delayFor(name)
	if delay <= 0 {
		finish()
		return v
	}
	time.AfterFunc(delay, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if m.versions[ver] == v && v.state == stateLoading {
			finish()
		}
	})
	return v
}

func (s *server) unload(v *version) {
	if v.state != stateEnd {
		s.n.Unloads.Add(1)
		v.predict = nil
		v.settle(stateEnd)
	}
}

func (s *server) reload(ctx context.Context, req []byte) ([]byte, error) {
	configs, ok := parseReload(req)
	if !ok {
		return nil, status.Error(codes.InvalidArgument, "malformed ReloadConfigRequest")
	}
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.mu.Lock()
	var wait []chan struct{}
	desired := map[string]bool{}
	for _, c := range configs {
		if c.name == "" {
			s.mu.Unlock()
			return nil, status.Error(codes.InvalidArgument, "a model config without a name")
		}
		desired[c.name] = true
		m := s.models[c.name]
		if m == nil {
			m = &model{versions: map[int64]*version{}}
			s.models[c.name] = m
		}
		newName := !m.configured
		m.configured = true
		want := map[int64]bool{}
		for _, ver := range c.versionsOf() {
			want[ver] = true
			if v := m.versions[ver]; v == nil || v.state == stateEnd {
				v = s.startLoad(m, c.name, ver)
				if newName {
					wait = append(wait, v.ready)
				}
			}
		}
		for ver, v := range m.versions {
			if !want[ver] {
				s.unload(v)
			}
		}
	}
	for name, m := range s.models {
		if !desired[name] && m.configured {
			m.configured = false
			for _, v := range m.versions {
				s.unload(v)
			}
		}
	}
	s.mu.Unlock()
	for _, ch := range wait {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	return []byte{}, nil // ReloadConfigResponse{}: status OK
}

type versionState struct {
	version int64
	state   int
}

func (s *server) statuses(name string, ver int64, hasVersion bool) ([]versionState, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m := s.models[name]
	if m == nil || len(m.versions) == 0 {
		return nil, status.Errorf(codes.NotFound, "Could not find any versions of model %s", name)
	}
	if hasVersion {
		v := m.versions[ver]
		if v == nil {
			return nil, status.Errorf(codes.NotFound, "Could not find version %d of model %s", ver, name)
		}
		return []versionState{{ver, v.state}}, nil
	}
	out := make([]versionState, 0, len(m.versions))
	for vn, v := range m.versions {
		out = append(out, versionState{vn, v.state})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version > out[j].version })
	return out, nil
}

// servable finds the AVAILABLE version a request names (the highest one for none); s.mu is held.
func (s *server) servable(name string, ver int64, hasVersion bool) (*version, error) {
	m := s.models[name]
	if hasVersion {
		if m != nil {
			if v := m.versions[ver]; v != nil && v.state == stateAvailable {
				return v, nil
			}
		}
		return nil, status.Errorf(codes.NotFound, "Servable not found for request: Specific(%s, %d)", name, ver)
	}
	var best *version
	bestVer := int64(-1)
	if m != nil {
		for vn, v := range m.versions {
			if v.state == stateAvailable && vn > bestVer {
				best, bestVer = v, vn
			}
		}
	}
	if best == nil {
		return nil, status.Errorf(codes.NotFound, "Servable not found for request: Latest(%s)", name)
	}
	return best, nil
}

// -- gRPC -----------------------------------------------------------------------------------

func (s *server) handleGrpc(_ any, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	var req []byte
	if err := stream.RecvMsg(&req); err != nil {
		return err
	}
	var resp []byte
	var err error
	switch method {
	case methodPredict:
		s.n.GrpcPredict.Add(1)
		resp, err = s.grpcPredict(req)
	case methodStatus:
		s.n.GrpcStatus.Add(1)
		resp, err = s.grpcStatus(req)
	case methodReload:
		s.n.GrpcReload.Add(1)
		resp, err = s.reload(stream.Context(), req)
	default:
		s.n.GrpcOther.Add(1)
		return status.Errorf(codes.Unimplemented, "fastbackend does not implement %s", method)
	}
	if err != nil {
		return err
	}
	return stream.SendMsg(&resp)
}

func (s *server) grpcPredict(req []byte) ([]byte, error) {
	spec, ok := parseModelSpec(req)
	if !ok || spec.name == "" {
		return nil, status.Error(codes.InvalidArgument, "Missing ModelSpec")
	}
	if spec.label != "" {
		return nil, status.Error(codes.Unimplemented, "fastbackend does not serve version labels")
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	v, err := s.servable(spec.name, spec.version, spec.hasVersion)
	if err != nil {
		return nil, err
	}
	return v.predict, nil
}

func (s *server) grpcStatus(req []byte) ([]byte, error) {
	spec, ok := parseModelSpec(req)
	if !ok || spec.name == "" {
		return nil, status.Error(codes.InvalidArgument, "Missing ModelSpec")
	}
	sts, err := s.statuses(spec.name, spec.version, spec.hasVersion)
	if err != nil {
		return nil, err
	}
	var b []byte
	for _, st := range sts {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, encodeVersionStatus(st.version, st.state))
	}
	return b, nil
}

// -- REST -----------------------------------------------------------------------------------

type restVersionStatus struct {
	Version string            `json:"version"`
	State   string            `json:"state"`
	Status  map[string]string `json:"status"`
}

func restStatusDoc(sts []versionState) map[string][]restVersionStatus {
	out := make([]restVersionStatus, 0, len(sts))
	for _, st := range sts {
		out = append(out, restVersionStatus{strconv.FormatInt(st.version, 10), stateNames[st.state],
			map[string]string{"error_code": "OK", "error_message": ""}})
	}
	return map[string][]restVersionStatus{"model_version_status": out}
}

var httpCodes = map[codes.Code]int{codes.InvalidArgument: 400, codes.NotFound: 404, codes.Unimplemented: 501}

func restError(w http.ResponseWriter, err error) {
	st := status.Convert(err)
	code, ok := httpCodes[st.Code()]
	if !ok {
		code = 500
	}
	body, _ := json.Marshal(map[string]string{"error": st.Message()})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

func writeJSON(w http.ResponseWriter, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}

// /v1/models/<name>[/versions/<N>][:<verb>]
func parseRestPath(path string) (name string, ver int64, hasVersion bool, verb string, err error) {
	rest := path[len("/v1/models/"):]
	if i := strings.LastIndexByte(rest, ':'); i >= 0 {
		rest, verb = rest[:i], rest[i+1:]
	}
	parts := strings.Split(rest, "/")
	name = parts[0]
	switch {
	case name == "":
		err = status.Error(codes.InvalidArgument, "Missing model name in request.")
	case len(parts) == 1:
	case len(parts) == 3 && strings.EqualFold(parts[1], "versions"):
		ver, err = strconv.ParseInt(parts[2], 10, 64)
		hasVersion = true
		if err != nil {
			err = status.Errorf(codes.InvalidArgument, "Malformed request: %s", path)
		}
	default:
		err = status.Errorf(codes.Unimplemented, "fastbackend does not serve %s", path)
	}
	return
}

func (s *server) handleRest(w http.ResponseWriter, r *http.Request) {
	name, ver, hasVersion, verb, err := parseRestPath(r.URL.Path)
	if err != nil {
		s.n.RestOther.Add(1)
		restError(w, err)
		return
	}
	switch {
	case r.Method == http.MethodPost && strings.EqualFold(verb, "predict"):
		s.n.RestPredict.Add(1)
		reply := []byte(restPredictBody)
		if s.echoPrefix != "" && strings.HasPrefix(name, s.echoPrefix) {
			reply, _ = io.ReadAll(r.Body)
		} else {
			_, _ = io.Copy(io.Discard, r.Body)
		}
		s.mu.RLock()
		_, err := s.servable(name, ver, hasVersion)
		s.mu.RUnlock()
		if err != nil {
			restError(w, err)
			return
		}
		writeJSON(w, reply)
	case r.Method == http.MethodGet && verb == "":
		s.n.RestStatus.Add(1)
		sts, err := s.statuses(name, ver, hasVersion)
		if err != nil {
			restError(w, err)
			return
		}
		body, _ := json.Marshal(restStatusDoc(sts))
		writeJSON(w, body)
	default:
		s.n.RestOther.Add(1)
		restError(w, status.Errorf(codes.Unimplemented, "fastbackend does not serve %s %s", r.Method, r.URL.Path))
	}
}

func (s *server) handleCounters(w http.ResponseWriter, _ *http.Request) {
	s.mu.RLock()
	available := 0
	for _, m := range s.models {
		for _, v := range m.versions {
			if v.state == stateAvailable {
				available++
			}
		}
	}
	s.mu.RUnlock()
	body, _ := json.Marshal(map[string]any{
		"requests": map[string]int64{
			"grpc_predict": s.n.GrpcPredict.Load(), "grpc_status": s.n.GrpcStatus.Load(),
			"grpc_reload": s.n.GrpcReload.Load(), "grpc_other": s.n.GrpcOther.Load(),
			"rest_predict": s.n.RestPredict.Load(), "rest_status": s.n.RestStatus.Load(),
			"rest_other": s.n.RestOther.Load(),
		},
		"loads": s.n.Loads.Load(), "unloads": s.n.Unloads.Load(), "available": available,
	})
	writeJSON(w, body)
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	grpcPort := flag.Int("grpc-port", 0, "gRPC port (0: the kernel chooses)")
	restPort := flag.Int("rest-port", 0, "REST port (0: the kernel chooses)")
	loadSeconds := flag.Float64("load-seconds", 0, "how long every model takes to become AVAILABLE")
	slowPrefix := flag.String("slow-load-prefix", "", "models whose name starts with this load slowly")
	slowSeconds := flag.Float64("slow-load-seconds", 5, "how long those take to become AVAILABLE")
	echoPrefix := flag.String("echo-prefix", "", "REST predictions of models whose name starts with this echo the request body")
	flag.Parse()

	s := &server{
		models: map[string]*model{}, loadDelay: time.Duration(*loadSeconds * float64(time.Second)),
		slowPrefix: *slowPrefix, slowDelay: time.Duration(*slowSeconds * float64(time.Second)),
		echoPrefix:    *echoPrefix,
		signatureName: "serving_default", outputTensorKey: "y",
	}
	gl, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*grpcPort)))
	if err != nil {
		log.Fatalf("fastbackend: gRPC listen: %v", err)
	}
	rl, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*restPort)))
	if err != nil {
		log.Fatalf("fastbackend: REST listen: %v", err)
	}
	gs := grpc.NewServer(grpc.ForceServerCodec(rawcodec.Codec{}), grpc.UnknownServiceHandler(s.handleGrpc),
		grpc.MaxRecvMsgSize(1<<30), grpc.MaxSendMsgSize(1<<30))
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/models/", s.handleRest)
	mux.HandleFunc("/fastbackend/counters", s.handleCounters)

	fmt.Printf("{\"grpc_port\": %d, \"rest_port\": %d, \"pid\": %d}\n",
		gl.Addr().(*net.TCPAddr).Port, rl.Addr().(*net.TCPAddr).Port, os.Getpid())
	_ = os.Stdout.Sync()
	errs := make(chan error, 2)
	go func() { errs <- gs.Serve(gl) }()
	go func() { errs <- http.Serve(rl, mux) }()
	log.Fatalf("fastbackend: %v", <-errs)
}
