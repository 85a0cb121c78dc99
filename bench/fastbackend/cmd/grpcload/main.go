// Command grpcload is the data-plane benchmark's gRPC load generator: unary calls of one method
// with a prepared request (raw bytes, never re-encoded), N concurrent callers over K channels
// (HTTP/2 connections), for a fixed time after a warm-up; or, with -once, one call per caller
// (the cold-model cell: each caller may name its own model with -rename-prefix).
//
//	grpcload -target 127.0.0.1:8500 -method /tensorflow.serving.PredictionService/Predict \
//	    -payload req.pb -concurrency 64 -duration 5s -warmup 300ms
//
// stdout: {"event": "start"} and {"event": "end"} when the measured window opens and closes
// (a parent samples the servers' CPU time between them), then one JSON line: requests (calls
// that succeeded inside the window), errors by gRPC code, rps, p50/p90/p99/max/mean latency in
// ms. Written in Go because a Python generator costs ~0.25 ms of CPU per call, which would be
// the bottleneck against a backend that answers 20,000 calls a second.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"

	"tfscache.bench/fastbackend/rawcodec"
)

type worker struct {
	lat    []time.Duration
	errors map[string]int
}

// renamed returns payload with model_spec.name (field 1.1) set to name; the rest of the spec
// and of the request stay as they are.
func renamed(payload []byte, name string) ([]byte, error) {
	var spec, rest []byte
	b := payload
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, fmt.Errorf("malformed payload")
		}
		m := protowire.ConsumeFieldValue(num, typ, b[n:])
		if m < 0 {
			return nil, fmt.Errorf("malformed payload")
		}
		if num == 1 && typ == protowire.BytesType {
			val, _ := protowire.ConsumeBytes(b[n:])
			spec = append(spec, val...) // repeated occurrences merge
		} else {
			rest = append(rest, b[:n+m]...)
		}
		b = b[n+m:]
	}
	var other []byte
	for len(spec) > 0 {
		num, typ, n := protowire.ConsumeTag(spec)
		m := protowire.ConsumeFieldValue(num, typ, spec[n:])
		if n < 0 || m < 0 {
			return nil, fmt.Errorf("malformed model_spec")
		}
		if num != 1 {
			other = append(other, spec[:n+m]...)
		}
		spec = spec[n+m:]
	}
	var newSpec []byte
	newSpec = protowire.AppendTag(newSpec, 1, protowire.BytesType)
	newSpec = protowire.AppendString(newSpec, name)
	newSpec = append(newSpec, other...)
	var out []byte
	out = protowire.AppendTag(out, 1, protowire.BytesType)
	out = protowire.AppendBytes(out, newSpec)
	return append(out, rest...), nil
}

func connect(target string, timeout time.Duration) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("passthrough:///"+target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawcodec.Codec{}), grpc.MaxCallRecvMsgSize(1<<30),
			grpc.MaxCallSendMsgSize(1<<30)))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn.Connect()
	for s := conn.GetState(); s != connectivity.Ready; s = conn.GetState() {
		if !conn.WaitForStateChange(ctx, s) {
			conn.Close()
			return nil, fmt.Errorf("no connection to %s within %s (state %s)", target, timeout, s)
		}
	}
	return conn, nil
}

func pct(xs []time.Duration, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	rank := int(float64(len(xs))*p/100+0.999999) - 1
	rank = max(0, min(len(xs)-1, rank))
	return float64(xs[rank]) / 1e6
}

func event(name string) {
	fmt.Printf("{\"event\": %q}\n", name)
	_ = os.Stdout.Sync()
}

func main() {
	target := flag.String("target", "", "host:port")
	method := flag.String("method", "/tensorflow.serving.PredictionService/Predict", "full method name")
	payloadFile := flag.String("payload", "", "file with the serialized request")
	concurrency := flag.Int("concurrency", 1, "concurrent callers")
	channels := flag.Int("channels", 0, "channels (HTTP/2 connections); 0 = ceil(concurrency/64)")
	duration := flag.Duration("duration", 5*time.Second, "measured window")
	warmup := flag.Duration("warmup", 300*time.Millisecond, "calls before the window, not counted")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline of each call")
	once := flag.Bool("once", false, "each caller makes one call (no warm-up; the run ends when all have answered)")
	renamePrefix := flag.String("rename-prefix", "", "caller i names model <prefix><i> in its request")
	flag.Parse()
	if *target == "" || *payloadFile == "" || *concurrency < 1 {
		fmt.Fprintln(os.Stderr, "grpcload: -target, -payload and -concurrency >= 1 are required")
		os.Exit(2)
	}
	payload, err := os.ReadFile(*payloadFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcload:", err)
		os.Exit(2)
	}
	nch := *channels
	if nch <= 0 {
		nch = (*concurrency + 63) / 64
	}
	conns := make([]*grpc.ClientConn, nch)
	for i := range conns {
		if conns[i], err = connect(*target, 10*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "grpcload:", err)
			os.Exit(1)
		}
	}
	payloads := make([][]byte, *concurrency)
	for i := range payloads {
		payloads[i] = payload
		if *renamePrefix != "" {
			if payloads[i], err = renamed(payload, *renamePrefix+strconv.Itoa(i)); err != nil {
				fmt.Fprintln(os.Stderr, "grpcload:", err)
				os.Exit(2)
			}
		}
	}

	workers := make([]worker, *concurrency)
	start := time.Now()
	measureFrom := start.Add(*warmup)
	if *once {
		measureFrom = start
	}
	stopAt := measureFrom.Add(*duration)
	var wg sync.WaitGroup
	var ready sync.WaitGroup
	ready.Add(1)
	for i := range workers {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			w := &workers[i]
			w.errors = map[string]int{}
			conn := conns[i%nch]
			req := payloads[i]
			ready.Wait()
			for {
				t0 := time.Now()
				if !*once && !t0.Before(stopAt) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				var resp []byte
				err := conn.Invoke(ctx, *method, &req, &resp)
				cancel()
				t1 := time.Now()
				counted := *once || (!t0.Before(measureFrom) && !t1.After(stopAt))
				if err != nil {
					if *once || !t0.Before(measureFrom) {
						w.errors[status.Code(err).String()]++
					}
				} else if counted {
					w.lat = append(w.lat, t1.Sub(t0))
				}
				if *once {
					return
				}
			}
		}(i)
	}
	ready.Done()
	var seconds float64
	if *once {
		event("start")
		wg.Wait()
		event("end")
		seconds = time.Since(start).Seconds()
	} else {
		time.Sleep(time.Until(measureFrom))
		event("start")
		time.Sleep(time.Until(stopAt))
		event("end")
		wg.Wait()
		seconds = duration.Seconds()
	}
	for _, c := range conns {
		c.Close()
	}

	var all []time.Duration
	errs := map[string]int{}
	for _, w := range workers {
		all = append(all, w.lat...)
		for k, v := range w.errors {
			errs[k] += v
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	var sum time.Duration
	for _, x := range all {
		sum += x
	}
	mean := 0.0
	if len(all) > 0 {
		mean = float64(sum) / float64(len(all)) / 1e6
	}
	out := map[string]any{
		"requests": len(all), "errors": errs, "seconds": seconds, "rps": float64(len(all)) / seconds,
		"p50_ms": pct(all, 50), "p90_ms": pct(all, 90), "p99_ms": pct(all, 99), "max_ms": pct(all, 100),
		"mean_ms": mean, "concurrency": *concurrency, "channels": nch,
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
