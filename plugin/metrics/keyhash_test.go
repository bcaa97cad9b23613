package metrics_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"github.com/hwkms/hwkms/plugin/metrics"
)

// TestAPIServerKeyHashCollector: hwkms_key_apiserver_hash_info carries audit.KeyIDHash,
// the label kube-apiserver gives the same key_id, next to hwkms's own key_id_hash.
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
		"primary": {kek.APIServerKeyIDHash("p11:new"), metrics.KeyIDHash("p11:new")},
		"decrypt": {kek.APIServerKeyIDHash("p11:old"), metrics.KeyIDHash("p11:old")},
	}
	if got["primary"] != want["primary"] || got["decrypt"] != want["decrypt"] {
		t.Errorf("labels %v, want %v", got, want)
	}
	// printf %s p11:new | sha256sum
	if want := "sha256:98adb5789bc08481f1c5b1720748c3bf89e3f8abfbb32701a0dace1242134ae2"; got["primary"][0] != want {
		t.Errorf("key_id_hash %s, want %s", got["primary"][0], want)
	}
}

// TestRegisterAPIServerKeyHash: the collector registered on a Metrics reads the keyring
// of the Service it watches at scrape time, primary first.
func TestRegisterAPIServerKeyHash(t *testing.T) {
	ring, err := plugin.NewKeyring(kektest.NewFake("p11:primary"), kektest.NewFake("p11:old"))
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{})
	t.Cleanup(func() { svc.Keyring().Close() })
	m := metrics.New("test", devices)
	if err := m.RegisterAPIServerKeyHash(); err != nil {
		t.Fatal(err)
	}
	if err := m.RegisterAPIServerKeyHash(); err == nil {
		t.Fatal("registering the collector twice succeeded")
	}
	m.Watch(svc)
	mfs, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	roles := map[string]string{}
	for _, mf := range mfs {
		if mf.GetName() != "hwkms_key_apiserver_hash_info" {
			continue
		}
		for _, mm := range mf.GetMetric() {
			l := map[string]string{}
			for _, p := range mm.GetLabel() {
				l[p.GetName()] = p.GetValue()
			}
			roles[l["key_id_hash"]] = l["role"]
		}
	}
	if roles[kek.APIServerKeyIDHash("p11:primary")] != "primary" || roles[kek.APIServerKeyIDHash("p11:old")] != "decrypt" || len(roles) != 2 {
		t.Fatalf("roles by key_id_hash: %v", roles)
	}
}
