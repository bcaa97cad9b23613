// Package benchrow owns the one result row of `hwkms bench`: what `hwkms bench --json`
// prints, one JSON object a line, and what cmd/benchtable reads back to build
// docs/BENCHMARKS.md. The JSON field names are the format between the two; add fields,
// never rename them.
//
// It does not own running the benchmark (cmd/hwkms bench.go) or the tables
// (cmd/benchtable).
package benchrow

// Row is one concurrency level of `hwkms bench`.
type Row struct {
	// Op is encrypt, decrypt, status or mixed.
	Op string `json:"op"`
	// Concurrency is the number of concurrent workers.
	Concurrency int `json:"concurrency"`
	// Count is the number of operations made.
	Count int `json:"count"`
	// Errors is the number of operations that failed.
	Errors int `json:"errors"`
	// Seconds is the level's wall time.
	Seconds float64 `json:"seconds"`
	// OpsPerSec is Count / Seconds.
	OpsPerSec float64 `json:"ops_per_sec"`
	// P50us, P90us and P99us are latency percentiles, MaxUs the slowest operation, in
	// microseconds.
	P50us float64 `json:"p50_us"`
	P90us float64 `json:"p90_us"`
	P99us float64 `json:"p99_us"`
	MaxUs float64 `json:"max_us"`
	// DeadlineExceeded and Unavailable count the failures (among Errors) answered
	// with those gRPC codes: a call that ran out of time, and one the plugin refused
	// (a device down, or a TPM call refused at once because it could not finish
	// before its deadline).
	DeadlineExceeded int `json:"deadline_exceeded,omitempty"`
	Unavailable      int `json:"unavailable,omitempty"`
	// FirstError is the first failure's message, if any.
	FirstError string `json:"first_error,omitempty"`
	// ServerPeakRSSKiB is VmHWM of the plugin's --pid after the level (0 without --pid).
	ServerPeakRSSKiB int `json:"server_peak_rss_kib,omitempty"`
}
