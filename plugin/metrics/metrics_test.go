package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/miekg/pkcs11"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin"
	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"github.com/hwkms/hwkms/plugin/metrics"
	"github.com/hwkms/hwkms/tpm"
)

// server is a running KMS socket plus metrics listener.
type server struct {
	svc     *plugin.Service
	m       *metrics.Metrics
	client  kmsapi.KeyManagementServiceClient
	baseURL string
}

func start(t *testing.T, keys ...kek.KEK) *server {
	t.Helper()
	ring, err := plugin.NewKeyring(keys[0], keys[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	m := metrics.New("test")
	svc := plugin.NewService(ring, plugin.Options{
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
		Observer:     m,
		DeviceReason: metrics.DeviceReason,
	})
	m.Watch(svc)
	dir, err := os.MkdirTemp("", "hwm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "kms.sock")

	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- plugin.Serve(ctx, svc, plugin.SocketOptions{Path: sock, GID: -1, Timeout: 3 * time.Second}, ready)
	}()
	ln, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	herrc := make(chan error, 1)
	go func() { herrc <- metrics.Serve(ctx, ln, metrics.Handler(m, svc)) }()
	select {
	case <-ready:
	case err := <-errc:
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if err := <-herrc; err != nil {
			t.Errorf("metrics.Serve: %v", err)
		}
	})
	return &server{svc: svc, m: m, client: kmsapi.NewKeyManagementServiceClient(conn), baseURL: "http://" + ln.Addr().String()}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := get(t, base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// value returns the value of the sample of family name whose labels include want, and
// whether one exists. For histograms it returns the sample count.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func mustValue(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string, want float64) {
	t.Helper()
	got, ok := value(fams, name, labels)
	if !ok {
		t.Fatalf("%s%v: no such sample", name, labels)
	}
	if got != want {
		t.Fatalf("%s%v = %v, want %v", name, labels, got, want)
	}
}

func TestEveryMetricAndEndpoint(t *testing.T) {
	primary, old := kektest.NewFake("key-b"), kektest.NewFake("key-a")
	s := start(t, primary, old)
	ctx := context.Background()

	// Before any probe: /healthz fails, /livez answers.
	if code, body := get(t, s.baseURL+"/healthz"); code != 503 || !strings.Contains(body, "no health probe") {
		t.Fatalf("/healthz before probe: %d %q", code, body)
	}
	if code, body := get(t, s.baseURL+"/livez"); code != 200 || body != "ok\n" {
		t.Fatalf("/livez: %d %q", code, body)
	}
	before := time.Now()
	s.svc.ProbeNow(ctx)
	if code, body := get(t, s.baseURL+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz after probe: %d %q", code, body)
	}

	// Requests: 1 Status, 2 Encrypt, 2 Decrypt ok, 1 Decrypt bad ciphertext, 1 Decrypt unknown key.
	if _, err := s.client.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		t.Fatal(err)
	}
	var ct []byte
	for range 2 {
		enc, err := s.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "u"})
		if err != nil {
			t.Fatal(err)
		}
		ct = enc.Ciphertext
		if _, err := s.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: "key-b", Uid: "u"}); err != nil {
			t.Fatal(err)
		}
	}
	bad := append([]byte(nil), ct...)
	bad[len(bad)-1] ^= 1
	_, err := s.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: bad, KeyId: "key-b"})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad ciphertext: %v", err)
	}
	_, err = s.client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: "nope"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("unknown key: %v", err)
	}
	// A device failure: counted under hwkms_device_errors_total.
	primary.SetFail(fmt.Errorf("mem: gone: %w", kek.ErrUnavailable))
	_, err = s.client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32)})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("failing device: %v", err)
	}
	s.m.ObserveReload(nil)
	s.m.ObserveReload(errors.New("broken config"))
	s.m.ObserveReload(errors.New("broken config"))

	f := scrape(t, s.baseURL)
	mustValue(t, f, "hwkms_requests_total", map[string]string{"method": "Status", "code": "OK"}, 1)
	mustValue(t, f, "hwkms_requests_total", map[string]string{"method": "Encrypt", "code": "OK"}, 2)
	mustValue(t, f, "hwkms_requests_total", map[string]string{"method": "Encrypt", "code": "Unavailable"}, 1)
	mustValue(t, f, "hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "OK"}, 2)
	mustValue(t, f, "hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "InvalidArgument"}, 1)
	mustValue(t, f, "hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "NotFound"}, 1)
	mustValue(t, f, "hwkms_request_duration_seconds", map[string]string{"method": "Decrypt"}, 4)
	mustValue(t, f, "hwkms_request_duration_seconds", map[string]string{"method": "Encrypt"}, 3)
	mustValue(t, f, "hwkms_request_duration_seconds", map[string]string{"method": "Status"}, 1)
	// Device ops: probe (1 wrap + 1 unwrap), 3 Encrypt wraps, 3 Decrypt unwraps (2 ok + 1 bad tag).
	mustValue(t, f, "hwkms_device_operation_duration_seconds", map[string]string{"backend": "test", "op": "wrap"}, 4)
	mustValue(t, f, "hwkms_device_operation_duration_seconds", map[string]string{"backend": "test", "op": "unwrap"}, 4)
	// Only the device failure counts; the bad ciphertext is the client's.
	mustValue(t, f, "hwkms_device_errors_total", map[string]string{"backend": "test", "op": "wrap", "reason": "unavailable"}, 1)
	if _, ok := value(f, "hwkms_device_errors_total", map[string]string{"op": "unwrap"}); ok {
		t.Fatal("bad ciphertext counted as a device error")
	}
	mustValue(t, f, "hwkms_reloads_total", map[string]string{"result": "ok"}, 1)
	mustValue(t, f, "hwkms_reloads_total", map[string]string{"result": "error"}, 2)
	mustValue(t, f, "hwkms_health_probe_ok", nil, 1)
	ts, _ := value(f, "hwkms_health_probe_timestamp_seconds", nil)
	if ts < float64(before.Unix()) || ts > float64(time.Now().Unix()+1) {
		t.Fatalf("probe timestamp %v, want about %v", ts, before.Unix())
	}
	mustValue(t, f, "hwkms_key_info", map[string]string{"key_id_hash": metrics.KeyIDHash("key-b"), "role": "primary", "backend": "test"}, 1)
	mustValue(t, f, "hwkms_key_info", map[string]string{"key_id_hash": metrics.KeyIDHash("key-a"), "role": "decrypt", "backend": "test"}, 1)
	mustValue(t, f, "hwkms_build_info", map[string]string{"version": "test"}, 1)
	if _, ok := f["process_resident_memory_bytes"]; !ok {
		t.Error("process collector missing")
	}
	if _, ok := f["go_goroutines"]; !ok {
		t.Error("go collector missing")
	}
	checkLabelsBounded(t, f, "key-a", "key-b", "nope")

	// The probe now fails: /healthz 503 with the short reason, gauge 0; /livez still 200.
	s.svc.ProbeNow(ctx)
	code, body := get(t, s.baseURL+"/healthz")
	if code != 503 || !strings.Contains(body, "device unavailable") || strings.Contains(body, "mem: gone") {
		t.Fatalf("/healthz with failing device: %d %q", code, body)
	}
	if code, _ := get(t, s.baseURL+"/livez"); code != 200 {
		t.Fatalf("/livez with failing device: %d", code)
	}
	f = scrape(t, s.baseURL)
	mustValue(t, f, "hwkms_health_probe_ok", nil, 0)
	mustValue(t, f, "hwkms_device_errors_total", map[string]string{"backend": "test", "op": "wrap", "reason": "unavailable"}, 2)

	// Only GET.
	resp, err := http.Post(s.baseURL+"/healthz", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /healthz: %d", resp.StatusCode)
	}
}

// checkLabelsBounded fails if any hwkms_ sample carries a raw key_id or an error text.
func checkLabelsBounded(t *testing.T, fams map[string]*dto.MetricFamily, rawKeyIDs ...string) {
	t.Helper()
	for name, f := range fams {
		if !strings.HasPrefix(name, "hwkms_") {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				v := l.GetValue()
				for _, id := range rawKeyIDs {
					if v == id {
						t.Errorf("%s has a raw key_id label %s=%q", name, l.GetName(), v)
					}
				}
				if strings.ContainsAny(v, " :") && l.GetName() != "version" && l.GetName() != "goversion" {
					t.Errorf("%s label %s=%q looks like free text", name, l.GetName(), v)
				}
			}
		}
	}
}

func TestDeviceReasonIsBounded(t *testing.T) {
	fmt1 := tpm2.TPMRC(uint32(tpm2.TPMRCIntegrity) | 0x040 | 0x100) // parameter 1
	for _, tc := range []struct {
		name string
		b    kek.Backend
		err  error
		want string
	}{
		{"ckr name", kek.BackendPKCS11, fmt.Errorf("hsm: C_Encrypt: %w: %w", kek.ErrUnavailable, pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)), "CKR_DEVICE_REMOVED"},
		{"pin error", kek.BackendPKCS11, &hsm.PINError{Token: "t", Err: pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)}, "CKR_PIN_INCORRECT"},
		{"vendor ckr", kek.BackendPKCS11, fmt.Errorf("x: %w", pkcs11.Error(0x80001234)), "other"},
		{"pkcs11 deadline", kek.BackendPKCS11, fmt.Errorf("hsm: waiting: %w", context.DeadlineExceeded), "deadline_exceeded"},
		{"pkcs11 closed", kek.BackendPKCS11, fmt.Errorf("hsm: %w", kek.ErrClosed), "closed"},
		{"tpm fmt0", kek.BackendTPM, fmt.Errorf("tpm: %w: %w", kek.ErrUnavailable, tpm2.TPMRCInitialize), "TPM_RC_INITIALIZE"},
		{"tpm fmt1", kek.BackendTPM, fmt.Errorf("tpm: load: %w: %w", kek.ErrInvalidCiphertext, fmt1), "TPM_RC_INTEGRITY"},
		{"tpm warning", kek.BackendTPM, tpm2.TPMRCRetry, "TPM_RC_RETRY"},
		{"tpm unknown rc", kek.BackendTPM, tpm2.TPMRC(0x7fffffff), "other"},
		{"tpm transport", kek.BackendTPM, fmt.Errorf("tpm: dial: %w: connection refused", kek.ErrUnavailable), "unavailable"},
		{"tpm policy", kek.BackendTPM, fmt.Errorf("x: %w: %w", tpm.ErrPolicy, kek.ErrUnavailable), "policy"},
		{"free text", kek.BackendTest, errors.New("CKR_SOMETHING: secret 1234"), "other"},
		{"nil", kek.BackendPKCS11, nil, "other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := metrics.DeviceReason(tc.b, tc.err); got != tc.want {
				t.Fatalf("DeviceReason = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestKeyIDHash(t *testing.T) {
	// printf %s p11:00 | sha256sum | cut -c1-12
	if got := metrics.KeyIDHash("p11:00"); got != "eca629fcf66e" {
		t.Fatalf("KeyIDHash = %q", got)
	}
}

// devKEK is a kektest.Fake that also reports what hsm.KEK and tpm.KEK report at scrape
// time: session pool, module re-initialisations, TPM reconnects.
type devKEK struct {
	*kektest.Fake
	pool               hsm.PoolStats
	reinitOK, reinitKO uint64
	reconnects         uint64
}

func (k *devKEK) Stats() hsm.PoolStats         { return k.pool }
func (k *devKEK) Reinits() (ok, failed uint64) { return k.reinitOK, k.reinitKO }
func (k *devKEK) Reconnects() uint64           { return k.reconnects }
func (k *devKEK) Backend() kek.Backend         { return kek.BackendPKCS11 }

// TestDeviceCollectorValues: the scrape-time collector exports each key's session pool
// (in use above zero), re-initialisation counts by result and reconnects as the key
// reports them, under that key's key_id hash.
func TestDeviceCollectorValues(t *testing.T) {
	k := &devKEK{Fake: kektest.NewFake("key-dev"), pool: hsm.PoolStats{Size: 8, InUse: 5}, reinitOK: 3, reinitKO: 7, reconnects: 2}
	s := start(t, k)
	fams := scrape(t, s.baseURL)
	h := metrics.KeyIDHash("key-dev")
	mustValue(t, fams, "hwkms_pkcs11_sessions", map[string]string{"key_id_hash": h}, 8)
	mustValue(t, fams, "hwkms_pkcs11_sessions_in_use", map[string]string{"key_id_hash": h}, 5)
	mustValue(t, fams, "hwkms_pkcs11_reinits_total", map[string]string{"key_id_hash": h, "result": "ok"}, 3)
	mustValue(t, fams, "hwkms_pkcs11_reinits_total", map[string]string{"key_id_hash": h, "result": "error"}, 7)
	mustValue(t, fams, "hwkms_tpm_reconnects_total", map[string]string{"key_id_hash": h}, 2)
}
