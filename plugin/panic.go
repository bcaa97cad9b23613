package plugin

import (
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sync/atomic"
)

// errPanic marks a request or probe that panicked (for example while a backend parsed
// a hostile device response). It maps to codes.Internal: the request fails, the
// process keeps serving.
var errPanic = errors.New("internal error: recovered from a panic")

// PanicObserver is an optional extension of Observer: an Observer that implements it
// is told about every panic the Service recovered, by method ("Encrypt", "Decrypt",
// "Status", "probe").
type PanicObserver interface {
	ObservePanic(method string)
}

// panicCounter counts recovered panics for Service.Panics.
type panicCounter struct{ n atomic.Uint64 }

// describePanic names a panic value without printing arbitrary data it may carry: a
// runtime error's text (index out of range, nil dereference: never secret), otherwise
// only the value's type.
func describePanic(v any) string {
	if re, ok := v.(runtime.Error); ok {
		return re.Error()
	}
	return fmt.Sprintf("panic value of type %T", v)
}

// recovered turns a recovered panic value into errPanic, logs it with its stack at
// error level, counts it and tells the Observer. It returns nil when v is nil.
func (s *Service) recovered(v any, method string) error {
	if v == nil {
		return nil
	}
	desc := describePanic(v)
	s.panics.n.Add(1)
	s.log.Error("recovered a panic; the call fails with Internal and hwkms keeps serving",
		"method", method, "panic", desc, slog.String("stack", string(debug.Stack())))
	if po, ok := s.obs.(PanicObserver); ok {
		po.ObservePanic(method)
	}
	return fmt.Errorf("%s: %w (%s)", method, errPanic, desc)
}

// Panics returns how many panics the Service has recovered since it was created.
func (s *Service) Panics() uint64 { return s.panics.n.Load() }
