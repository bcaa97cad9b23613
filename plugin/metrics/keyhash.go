package metrics

import (
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/prometheus/client_golang/prometheus"
)

// descAPIServerKeyHash maps each serving key to the label kube-apiserver's envelope
// metrics give it, so that PromQL can join the two on key_id_hash.
var descAPIServerKeyHash = prometheus.NewDesc("hwkms_key_apiserver_hash_info",
	"Always 1 for each key in the serving keyring. key_id_hash is the key_id as kube-apiserver's apiserver_envelope_encryption_key_id_hash_* metrics label it (\"sha256:\" and the hex SHA-256 of the key_id); hwkms_key_id_hash is the key_id_hash of the other hwkms_* metrics (its first 12 hex digits); role is primary (encrypts) or decrypt.",
	[]string{"key_id_hash", "hwkms_key_id_hash", "role"}, nil)

// NewAPIServerKeyHashCollector returns a collector of hwkms_key_apiserver_hash_info for
// the key_ids keys returns at scrape time, primary first. It never touches a device.
func NewAPIServerKeyHashCollector(keys func() []string) prometheus.Collector {
	return apiserverKeyHash{keys: keys}
}

// RegisterAPIServerKeyHash registers hwkms_key_apiserver_hash_info on m's registry,
// reading the keyring Watch set at scrape time.
func (m *Metrics) RegisterAPIServerKeyHash() error {
	return m.reg.Register(NewAPIServerKeyHashCollector(func() []string {
		svc := m.svc.Load()
		if svc == nil {
			return nil
		}
		var ids []string
		for _, k := range svc.Keyring().Keys() {
			ids = append(ids, k.ID())
		}
		return ids
	}))
}

type apiserverKeyHash struct{ keys func() []string }

func (c apiserverKeyHash) Describe(ch chan<- *prometheus.Desc) { ch <- descAPIServerKeyHash }

func (c apiserverKeyHash) Collect(ch chan<- prometheus.Metric) {
	for i, id := range c.keys() {
		role := "decrypt"
		if i == 0 {
			role = "primary"
		}
		ch <- prometheus.MustNewConstMetric(descAPIServerKeyHash, prometheus.GaugeValue, 1, kek.APIServerKeyIDHash(id), KeyIDHash(id), role)
	}
}
