package benchrow

import (
	"encoding/json"
	"reflect"
	"testing"
)

// TestJSONNames: the field names are the format between hwkms bench --json and
// cmd/benchtable (and every stored bench-*.jsonl): a rename breaks reading old runs.
func TestJSONNames(t *testing.T) {
	line := `{"op":"decrypt","concurrency":8,"count":100,"errors":1,"seconds":0.5,"ops_per_sec":200,"p50_us":10,"p90_us":20,"p99_us":30,"max_us":40,"first_error":"x","server_peak_rss_kib":1024}`
	var r Row
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		t.Fatal(err)
	}
	want := Row{Op: "decrypt", Concurrency: 8, Count: 100, Errors: 1, Seconds: 0.5, OpsPerSec: 200, P50us: 10, P90us: 20, P99us: 30, MaxUs: 40, FirstError: "x", ServerPeakRSSKiB: 1024}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("parsed %+v, want %+v", r, want)
	}
	out, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != line {
		t.Fatalf("marshalled\n%s\nwant\n%s", out, line)
	}
	// Without an error or --pid the optional fields are left out.
	out, _ = json.Marshal(Row{Op: "status"})
	if want := `{"op":"status","concurrency":0,"count":0,"errors":0,"seconds":0,"ops_per_sec":0,"p50_us":0,"p90_us":0,"p99_us":0,"max_us":0}`; string(out) != want {
		t.Fatalf("marshalled %s, want %s", out, want)
	}
}
