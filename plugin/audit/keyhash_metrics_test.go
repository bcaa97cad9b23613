package audit_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hwkms/hwkms/plugin/audit"
	"github.com/hwkms/hwkms/plugin/metrics"
)

// TestAPIServerKeyHashCollector lives here because plugin/metrics' test files belong to
// another change: hwkms_key_apiserver_hash_info carries audit.KeyIDHash, the label
// kube-apiserver gives the same key_id, next to hwkms's own key_id_hash.
func TestAPIServerKeyHashCollector(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.NewAPIServerKeyHashCollector(func() []string { return []string{"p11:new", "p11:old"} }))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	if len(mfs) != 1 || mfs[0].GetName() != "hwkms_key_apiserver_hash_info" || len(mfs[0].GetMetric()) != 2 {
		t.Fatalf("gathered %v", mfs)
	}
	got := map[string][3]string{}
	for _, m := range mfs[0].GetMetric() {
		l := map[string]string{}
		for _, p := range m.GetLabel() {
			l[p.GetName()] = p.GetValue()
		}
		if m.GetGauge().GetValue() != 1 {
			t.Errorf("value %v", m.GetGauge().GetValue())
		}
		got[l["role"]] = [3]string{l["key_id_hash"], l["hwkms_key_id_hash"]}
	}
	want := map[string][3]string{
		"primary": {audit.KeyIDHash("p11:new"), metrics.KeyIDHash("p11:new")},
		"decrypt": {audit.KeyIDHash("p11:old"), metrics.KeyIDHash("p11:old")},
	}
	if got["primary"] != want["primary"] || got["decrypt"] != want["decrypt"] {
		t.Errorf("labels %v, want %v", got, want)
	}
	// printf %s p11:new | sha256sum
	if want := "sha256:98adb5789bc08481f1c5b1720748c3bf89e3f8abfbb32701a0dace1242134ae2"; got["primary"][0] != want {
		t.Errorf("key_id_hash %s, want %s", got["primary"][0], want)
	}
}
