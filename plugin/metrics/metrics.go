package metrics

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"regexp"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc/codes"

	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
)

// Buckets is the latency histogram layout, in seconds, for requests and device
// operations: from 50 us (an in-process or SoftHSM operation) to 3 s (the default
// kube-apiserver provider timeout).
var Buckets = []float64{
	0.00005, 0.0001, 0.00025, 0.0005,
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
	0.1, 0.25, 0.5, 1, 3,
}

// Methods are the KMS v2 methods plugin.Service reports.
var Methods = []string{"Status", "Encrypt", "Decrypt"}

// Metrics records hwkms metrics on its own registry. It implements plugin.Observer and
// is safe for concurrent use. Create it with New.
type Metrics struct {
	reg *prometheus.Registry

	requests   *prometheus.CounterVec
	reqLatency *prometheus.HistogramVec
	devLatency *prometheus.HistogramVec
	devErrors  *prometheus.CounterVec
	reloads    *prometheus.CounterVec
	probeOK    prometheus.Gauge
	probeTime  prometheus.Gauge

	reason func(kek.Backend, error) string
	stats  func(kek.KEK) KeyStats

	svc atomic.Pointer[plugin.Service]
}

// Devices supplies what only the backends know; this package imports none of them
// (plugin/config provides both functions, cmd/hwkms serve passes them in).
type Devices struct {
	// Reason names a failed operation's error as the device of backend b reported it
	// (a CKR_ or TPM_RC_ name, or a lowercase class such as "policy"), or "" (see
	// DeviceReason). Nil: no device names.
	Reason func(b kek.Backend, err error) string
	// Stats returns what an open KEK reports of its device at scrape time. Nil: none.
	Stats func(k kek.KEK) KeyStats
}

// KeyStats are the device statistics of one KEK the collector exports; a Has field
// false leaves that series out for the key.
type KeyStats struct {
	// HasSessions: Sessions and SessionsInUse are set (PKCS#11 session pool).
	HasSessions bool
	// Sessions is the size of the session pool (hwkms_pkcs11_sessions).
	Sessions int
	// SessionsInUse is the number of sessions held by an operation.
	SessionsInUse int
	// HasReinits: ReinitsOK and ReinitsFailed are set (PKCS#11 module re-initialisations).
	HasReinits bool
	// ReinitsOK counts re-initialisations that succeeded.
	ReinitsOK uint64
	// ReinitsFailed counts re-initialisations that failed.
	ReinitsFailed uint64
	// HasReconnects: Reconnects is set (hwkms_tpm_reconnects_total).
	HasReconnects bool
	// Reconnects counts re-established TPM connections.
	Reconnects uint64
	// Mechanism is the mechanism a pkcs11 key wraps with (the mechanism label of
	// hwkms_key_info: aes-gcm, aes-gcm-token-iv, aes-cbc-hmac, rsa-oaep), "" otherwise.
	Mechanism string
}

var _ plugin.Observer = (*Metrics)(nil)

// New returns Metrics on a new registry, with Go runtime and process collectors and
// hwkms_build_info{version}; dev names device errors and reads device statistics.
// Call Watch to export the serving keyring.
func New(version string, dev Devices) *Metrics {
	m := &Metrics{
		reason: DeviceReason(dev.Reason),
		stats:  dev.Stats,
		reg:    prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hwkms_requests_total",
			Help: "KMS v2 requests handled, by method (Status, Encrypt, Decrypt) and gRPC status code.",
		}, []string{"method", "code"}),
		reqLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hwkms_request_duration_seconds",
			Help:    "Time to handle a KMS v2 request inside the plugin, by method.",
			Buckets: Buckets,
		}, []string{"method"}),
		devLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "hwkms_device_operation_duration_seconds",
			Help:    "Time of one KEK operation on the device (requests and health probes), by backend (pkcs11, tpm) and op (wrap, unwrap).",
			Buckets: Buckets,
		}, []string{"backend", "op"}),
		devErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hwkms_device_errors_total",
			Help: "KEK operations that failed for a device reason (not for bad client input), by backend, op and reason (a CKR_ or TPM_RC_ name, or key_not_found, unavailable, deadline_exceeded, closed, policy, other).",
		}, []string{"backend", "op", "reason"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hwkms_reloads_total",
			Help: "Config reload attempts (SIGHUP or file change), by result (ok, error). On error the previous keys keep serving.",
		}, []string{"result"}),
		probeOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hwkms_health_probe_ok",
			Help: "1 if the latest health probe (a wrap+unwrap round trip on the primary KEK) succeeded, else 0.",
		}),
		probeTime: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hwkms_health_probe_timestamp_seconds",
			Help: "Unix time at which the latest health probe finished; 0 before the first probe.",
		}),
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "hwkms_build_info",
		Help: "Always 1; labelled with the hwkms version and the Go version it was built with.",
	}, []string{"version", "goversion"})
	build.WithLabelValues(version, runtime.Version()).Set(1)

	m.reg.MustRegister(
		m.requests, m.reqLatency, m.devLatency, m.devErrors, m.reloads, m.probeOK, m.probeTime, build,
		keyringCollector{m},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	// Series that alerts compare against exist from the start, at zero.
	for _, r := range []string{"ok", "error"} {
		m.reloads.WithLabelValues(r)
	}
	for _, method := range Methods {
		m.requests.WithLabelValues(method, codes.OK.String())
		m.reqLatency.WithLabelValues(method)
	}
	return m
}

// Registry returns the registry the metrics are on.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Watch makes the metrics export svc's current keyring at every scrape: key info,
// PKCS#11 session pools and re-initialisations, TPM reconnects. It follows reloads, since it reads
// svc.Keyring() each time.
func (m *Metrics) Watch(svc *plugin.Service) { m.svc.Store(svc) }

// ObserveRequest implements plugin.Observer.
func (m *Metrics) ObserveRequest(method string, code codes.Code, d time.Duration) {
	m.requests.WithLabelValues(method, code.String()).Inc()
	m.reqLatency.WithLabelValues(method).Observe(d.Seconds())
}

// ObserveProbe implements plugin.Observer.
func (m *Metrics) ObserveProbe(h plugin.Health) {
	if h.OK {
		m.probeOK.Set(1)
	} else {
		m.probeOK.Set(0)
	}
	if !h.At.IsZero() {
		m.probeTime.Set(float64(h.At.UnixNano()) / 1e9)
	}
}

// ObserveDevice implements plugin.Observer. Failures caused by the client's input
// (kek.ErrInvalidCiphertext, kek.ErrInvalidInput) or by the client going away
// (context.Canceled) are timed but not counted as device errors: they show as
// hwkms_requests_total codes instead.
func (m *Metrics) ObserveDevice(b kek.Backend, op string, d time.Duration, err error) {
	m.devLatency.WithLabelValues(b.String(), op).Observe(d.Seconds())
	if err == nil || clientFault(err) {
		return
	}
	m.devErrors.WithLabelValues(b.String(), op, m.reason(b, err)).Inc()
}

// ObserveReload records one config reload attempt; pass the reload's error, nil on
// success. Its signature fits config.Reloader.OnReload.
func (m *Metrics) ObserveReload(err error) {
	if err != nil {
		m.reloads.WithLabelValues("error").Inc()
		return
	}
	m.reloads.WithLabelValues("ok").Inc()
}

func clientFault(err error) bool {
	return errors.Is(err, kek.ErrInvalidCiphertext) || errors.Is(err, kek.ErrInvalidInput) ||
		errors.Is(err, context.Canceled)
}

// reasonName is the shape every device name must have; deviceClass the shape of a
// backend's own class ("policy"). Anything else becomes "other".
var (
	reasonName  = regexp.MustCompile(`^(CKR_|TPM_RC_)[A-Z0-9_]{1,40}$`)
	deviceClass = regexp.MustCompile(`^[a-z][a-z_]{0,30}$`)
)

// DeviceReason returns the function that names, shortly and boundedly, why a KEK
// operation on backend b failed: the CK_RV or TPM_RC name device gives when the device
// answered with one, else "key_not_found", "deadline_exceeded", "canceled", "closed",
// a class device gives (e.g. "policy" for a TPM PCR policy), "invalid_ciphertext",
// "unavailable" or "other". It is fit for a metric label and a log attribute; it never
// contains an error message. A key that is gone from the device (destroyed, token
// re-initialised) is "key_not_found". device may be nil (no device names).
func DeviceReason(device func(b kek.Backend, err error) string) func(b kek.Backend, err error) string {
	return func(b kek.Backend, err error) string {
		var name string
		if device != nil && err != nil {
			name = device(b, err)
		}
		if reasonName.MatchString(name) {
			return name
		}
		switch {
		case err == nil:
			return "other"
		case errors.Is(err, kek.ErrKeyNotFound):
			return "key_not_found"
		case errors.Is(err, context.DeadlineExceeded):
			return "deadline_exceeded"
		case errors.Is(err, context.Canceled):
			return "canceled"
		case errors.Is(err, kek.ErrClosed):
			return "closed"
		case name != "other" && deviceClass.MatchString(name):
			return name
		case errors.Is(err, kek.ErrInvalidCiphertext):
			return "invalid_ciphertext"
		case errors.Is(err, kek.ErrUnavailable):
			return "unavailable"
		}
		return "other"
	}
}

// KeyIDHash is the label that stands for a key_id in hwkms metrics: the first 12 hex
// digits of SHA-256(key_id). Compute it for a key_id with
// `printf %s "$KEY_ID" | sha256sum | cut -c1-12`.
func KeyIDHash(keyID string) string {
	sum := sha256.Sum256([]byte(keyID))
	return hex.EncodeToString(sum[:])[:12]
}

var (
	descKeyInfo = prometheus.NewDesc("hwkms_key_info",
		"Always 1 for each key in the serving keyring; key_id_hash is the first 12 hex digits of SHA-256(key_id), role is primary (encrypts) or decrypt, mechanism is how a pkcs11 key wraps (aes-gcm, aes-gcm-token-iv, aes-cbc-hmac, rsa-oaep; empty for other backends).",
		[]string{"key_id_hash", "role", "backend", "mechanism"}, nil)
	descPoolSize = prometheus.NewDesc("hwkms_pkcs11_sessions",
		"Size of the PKCS#11 session pool of each pkcs11 key.",
		[]string{"key_id_hash"}, nil)
	descPoolInUse = prometheus.NewDesc("hwkms_pkcs11_sessions_in_use",
		"PKCS#11 sessions of each pkcs11 key held by an operation at scrape time.",
		[]string{"key_id_hash"}, nil)
	descReinits = prometheus.NewDesc("hwkms_pkcs11_reinits_total",
		"Re-initialisations (C_Finalize, C_Initialize, login again) of the PKCS#11 module each pkcs11 key uses, after a device-class error, by result (ok or error). Counts are per module, since the module was loaded.",
		[]string{"key_id_hash", "result"}, nil)
	descReconnects = prometheus.NewDesc("hwkms_tpm_reconnects_total",
		"Times each tpm key re-established its TPM connection after losing it (TPM or swtpm restart, transport failure). Restarts from 0 when the key is reloaded.",
		[]string{"key_id_hash"}, nil)
)

// keyringCollector reads the serving keyring at scrape time. It never touches a device.
type keyringCollector struct{ m *Metrics }

func (c keyringCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descKeyInfo
	ch <- descPoolSize
	ch <- descPoolInUse
	ch <- descReinits
	ch <- descReconnects
}

func (c keyringCollector) Collect(ch chan<- prometheus.Metric) {
	svc := c.m.svc.Load()
	if svc == nil {
		return
	}
	for i, k := range svc.Keyring().Keys() {
		h := KeyIDHash(k.ID())
		role := "decrypt"
		if i == 0 {
			role = "primary"
		}
		var st KeyStats
		if c.m.stats != nil {
			st = c.m.stats(k)
		}
		ch <- prometheus.MustNewConstMetric(descKeyInfo, prometheus.GaugeValue, 1, h, role, k.Backend().String(), st.Mechanism)
		if c.m.stats == nil {
			continue
		}
		if st.HasSessions {
			ch <- prometheus.MustNewConstMetric(descPoolSize, prometheus.GaugeValue, float64(st.Sessions), h)
			ch <- prometheus.MustNewConstMetric(descPoolInUse, prometheus.GaugeValue, float64(st.SessionsInUse), h)
		}
		if st.HasReinits {
			ch <- prometheus.MustNewConstMetric(descReinits, prometheus.CounterValue, float64(st.ReinitsOK), h, "ok")
			ch <- prometheus.MustNewConstMetric(descReinits, prometheus.CounterValue, float64(st.ReinitsFailed), h, "error")
		}
		if st.HasReconnects {
			ch <- prometheus.MustNewConstMetric(descReconnects, prometheus.CounterValue, float64(st.Reconnects), h)
		}
	}
}
