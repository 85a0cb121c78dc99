// Package rawcodec is a gRPC codec that passes messages through as bytes: the benchmark tools
// hand-encode the few TF Serving messages they need (protowire) instead of carrying generated
// TF Serving code, and the load generator sends a prepared request without re-encoding it.
package rawcodec

import "fmt"

// Codec marshals *[]byte (or []byte) as is and unmarshals into a *[]byte.
type Codec struct{}

func (Codec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case *[]byte:
		return *m, nil
	case []byte:
		return m, nil
	}
	return nil, fmt.Errorf("rawcodec: cannot marshal %T", v)
}

func (Codec) Unmarshal(data []byte, v any) error {
	m, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawcodec: cannot unmarshal into %T", v)
	}
	*m = append((*m)[:0], data...)
	return nil
}

// Name is "proto" so that the content-subtype on the wire is what every gRPC peer expects.
func (Codec) Name() string { return "proto" }
