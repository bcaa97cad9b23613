package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
)

// pprofEnv names the environment variable that turns on the Go profiler of `hwkms serve`
// and `hwkms dev` (docs/BENCHMARKS.md): HWKMS_PPROF=127.0.0.1:6060 serves
// /debug/pprof/ on that address. It is off by default, and only loopback addresses are
// accepted: profiles show function names and timings, never key material, but they are
// no business of other hosts.
const pprofEnv = "HWKMS_PPROF"

// startPprof serves net/http/pprof on the loopback address in $HWKMS_PPROF, if set.
func startPprof(log *slog.Logger) error {
	addr := os.Getenv(pprofEnv)
	if addr == "" {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s=%q: %w", pprofEnv, addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("%s=%q: the profiler listens on loopback addresses only", pprofEnv, addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("%s: %w", pprofEnv, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	log.Warn("profiler on (not for production)", "address", ln.Addr().String(), "env", pprofEnv)
	go func() {
		if err := http.Serve(ln, mux); err != nil && !errors.Is(err, net.ErrClosed) {
			log.Error("profiler stopped", "err", err)
		}
	}()
	return nil
}
