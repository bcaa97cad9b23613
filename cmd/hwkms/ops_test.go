package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/plugin/metrics"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
	"github.com/hwkms/hwkms/tpm"
	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

// lockedBuffer collects log output from concurrent goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// running is serveWith running in the background.
type running struct {
	client  kmsapi.KeyManagementServiceClient
	metrics string // base URL of the metrics listener
	stop    func() error
}

func startServeWith(t *testing.T, path string, log *slog.Logger) *running {
	t.Helper()
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	addr := make(chan net.Addr, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- serveWith(ctx, cfg, path, log, serveHooks{ready: ready, metricsAddr: func(a net.Addr) { addr <- a }})
	}()
	select {
	case <-ready:
	case err := <-errc:
		t.Fatalf("serve: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+cfg.Socket.Path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	var stopErr error
	stop := func() error {
		once.Do(func() {
			conn.Close()
			cancel()
			stopErr = <-errc
		})
		return stopErr
	}
	t.Cleanup(func() { stop() })
	return &running{client: kmsapi.NewKeyManagementServiceClient(conn), metrics: "http://" + (<-addr).String(), stop: stop}
}

func scrapeURL(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	f, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// sample returns the value (histograms: the count) of the first sample of name whose
// labels include want.
func sample(f map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
next:
	for _, m := range f[name].GetMetric() {
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

func waitSample(t *testing.T, base, name string, labels map[string]string, want float64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		v, _ := sample(scrapeURL(t, base), name, labels)
		if v == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%v = %v, want %v", name, labels, v, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func writeAuth(t *testing.T, dir, name string) (string, string) {
	t.Helper()
	v := randomHex(12) // 24 bytes
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(v), 0o600); err != nil {
		t.Fatal(err)
	}
	return p, v
}

// TestServeMetricsAndLogsWithRealDevices runs the real serve path with SoftHSM2 and
// swtpm at debug level, with metrics on: requests, a rotation to a TPM primary by file
// reload, failures (bad ciphertext, unknown key_id, a reload with a wrong PIN, one with
// a wrong TPM auth value, the TPM going away and coming back). It scrapes every metric
// from the listener, then checks that no log line at any level, in text or JSON,
// carries the plaintext (raw, hex, base64), a PIN or an auth value.
func TestServeMetricsAndLogsWithRealDevices(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) { testServeMetricsAndLogs(t, format) })
	}
}

func testServeMetricsAndLogs(t *testing.T, format string) {
	ctx := context.Background()
	fx := softhsmtest.New(t)
	tokA, tokB := softhsmtest.NewToken(t, fx), softhsmtest.NewToken(t, fx)
	sim, sim2 := swtpmtest.New(t), swtpmtest.New(t)
	dir := shortDir(t)

	keyA := hsm.Config{Module: fx.Module, TokenLabel: tokA.Label, PINFile: tokA.PINFile, KeyLabel: "kek-a", Sessions: 3}
	infoA, err := hsm.CreateKey(ctx, keyA)
	if err != nil {
		t.Fatal(err)
	}
	keyB := hsm.Config{Module: fx.Module, TokenLabel: tokB.Label, PINFile: tokB.PINFile, KeyLabel: "kek-b"}
	if _, err := hsm.CreateKey(ctx, keyB); err != nil {
		t.Fatal(err)
	}
	wrongPIN := randomHex(8)
	keyB.PINFile = filepath.Join(dir, "wrong.pin")
	if err := os.WriteFile(keyB.PINFile, []byte(wrongPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	authT, authTValue := writeAuth(t, dir, "t.auth")
	keyT := tpm.Config{Device: sim.Device, BlobFile: filepath.Join(dir, "t.blob"), AuthFile: authT}
	infoT, err := tpm.CreateKey(ctx, keyT)
	if err != nil {
		t.Fatal(err)
	}
	authU, authUValue := writeAuth(t, dir, "u.auth")
	keyU := tpm.Config{Device: sim2.Device, BlobFile: filepath.Join(dir, "u.blob"), AuthFile: authU}
	if _, err := tpm.CreateKey(ctx, keyU); err != nil {
		t.Fatal(err)
	}
	wrongAuth, wrongAuthValue := writeAuth(t, dir, "wrong.auth")
	keyU.AuthFile = wrongAuth

	path := filepath.Join(dir, "hwkms.yaml")
	base := config.Config{
		Socket:  config.Socket{Path: filepath.Join(dir, "kms.sock")},
		Log:     config.Log{Level: "debug", Format: format},
		Metrics: config.Metrics{Address: "127.0.0.1:0"},
	}
	withKeys := func(keys ...config.Key) *config.Config { c := base; c.Keys = keys; return &c }
	writeYAML(t, path, withKeys(config.Key{PKCS11: &keyA}))
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	srv := startServeWith(t, path, cfg.Logger(logs))
	c := srv.client

	pt := make([]byte, 32)
	rand.Read(pt)
	encA, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "enc-1"})
	if err != nil || encA.KeyId != infoA.KeyID {
		t.Fatalf("Encrypt: %v %v", encA, err)
	}
	if dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: encA.Ciphertext, KeyId: encA.KeyId}); err != nil || !bytes.Equal(dec.Plaintext, pt) {
		t.Fatalf("Decrypt: %v", err)
	}

	// Rotate to a TPM primary by editing the file (reload ok).
	writeYAML(t, path, withKeys(config.Key{TPM: &keyT}, config.Key{PKCS11: &keyA}))
	waitSample(t, srv.metrics, "hwkms_reloads_total", map[string]string{"result": "ok"}, 1)
	encT, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "enc-2"})
	if err != nil || encT.KeyId != infoT.KeyID {
		t.Fatalf("Encrypt with the TPM: %v %v", encT, err)
	}
	for _, e := range []*kmsapi.EncryptResponse{encA, encT} {
		if dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: e.Ciphertext, KeyId: e.KeyId}); err != nil || !bytes.Equal(dec.Plaintext, pt) {
			t.Fatalf("Decrypt under %s: %v", e.KeyId, err)
		}
	}
	// Failures: a bad tag under each backend, an unknown key_id.
	for _, e := range []*kmsapi.EncryptResponse{encA, encT} {
		bad := bytes.Clone(e.Ciphertext)
		bad[len(bad)-3] ^= 0x40
		if _, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: bad, KeyId: e.KeyId}); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("bad ciphertext under %s: %v", e.KeyId, err)
		}
	}
	if _, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: encA.Ciphertext, KeyId: "p11:unknown"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown key_id: %v", err)
	}
	// Reloads that fail: a wrong PIN on a second token, then a wrong TPM auth value.
	writeYAML(t, path, withKeys(config.Key{PKCS11: &keyB}, config.Key{TPM: &keyT}, config.Key{PKCS11: &keyA}))
	waitSample(t, srv.metrics, "hwkms_reloads_total", map[string]string{"result": "error"}, 1)
	writeYAML(t, path, withKeys(config.Key{TPM: &keyU}, config.Key{TPM: &keyT}, config.Key{PKCS11: &keyA}))
	waitSample(t, srv.metrics, "hwkms_reloads_total", map[string]string{"result": "error"}, 2)
	// The TPM goes away, then comes back: one reconnect.
	if err := sim.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: encT.Ciphertext, KeyId: encT.KeyId}); status.Code(err) != codes.Unavailable {
		t.Fatalf("Decrypt with the TPM down: %v", err)
	}
	if err := sim.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: encT.Ciphertext, KeyId: encT.KeyId}); err != nil || !bytes.Equal(dec.Plaintext, pt) {
		t.Fatalf("Decrypt after the TPM came back: %v", err)
	}
	if _, err := c.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
		t.Fatal(err)
	}

	f := scrapeURL(t, srv.metrics)
	hA, hT := metrics.KeyIDHash(infoA.KeyID), metrics.KeyIDHash(infoT.KeyID)
	for _, w := range []struct {
		name   string
		labels map[string]string
		min    float64
	}{
		{"hwkms_requests_total", map[string]string{"method": "Encrypt", "code": "OK"}, 2},
		{"hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "OK"}, 4},
		{"hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "InvalidArgument"}, 2},
		{"hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "NotFound"}, 1},
		{"hwkms_requests_total", map[string]string{"method": "Decrypt", "code": "Unavailable"}, 1},
		{"hwkms_requests_total", map[string]string{"method": "Status", "code": "OK"}, 1},
		{"hwkms_request_duration_seconds", map[string]string{"method": "Decrypt"}, 8},
		{"hwkms_device_operation_duration_seconds", map[string]string{"backend": "pkcs11", "op": "wrap"}, 2},
		{"hwkms_device_operation_duration_seconds", map[string]string{"backend": "pkcs11", "op": "unwrap"}, 3},
		{"hwkms_device_operation_duration_seconds", map[string]string{"backend": "tpm", "op": "wrap"}, 1},
		{"hwkms_device_operation_duration_seconds", map[string]string{"backend": "tpm", "op": "unwrap"}, 3},
		{"hwkms_device_errors_total", map[string]string{"backend": "tpm", "op": "unwrap", "reason": "unavailable"}, 1},
		{"hwkms_reloads_total", map[string]string{"result": "ok"}, 1},
		{"hwkms_reloads_total", map[string]string{"result": "error"}, 2},
		{"hwkms_health_probe_ok", nil, 1},
		{"hwkms_health_probe_timestamp_seconds", nil, float64(time.Now().Add(-time.Minute).Unix())},
		{"hwkms_key_info", map[string]string{"key_id_hash": hT, "role": "primary", "backend": "tpm", "mechanism": ""}, 1},
		{"hwkms_key_info", map[string]string{"key_id_hash": hA, "role": "decrypt", "backend": "pkcs11", "mechanism": "aes-gcm"}, 1},
		{"hwkms_pkcs11_sessions", map[string]string{"key_id_hash": hA}, 3},
		{"hwkms_pkcs11_sessions_in_use", map[string]string{"key_id_hash": hA}, 0},
		{"hwkms_tpm_reconnects_total", map[string]string{"key_id_hash": hT}, 1},
		{"hwkms_pkcs11_reinits_total", map[string]string{"key_id_hash": hA, "result": "ok"}, 0},
		{"hwkms_pkcs11_reinits_total", map[string]string{"key_id_hash": hA, "result": "error"}, 0},
		{"hwkms_build_info", nil, 1},
	} {
		v, ok := sample(f, w.name, w.labels)
		if !ok || v < w.min {
			t.Errorf("%s%v = %v (present %v), want >= %v", w.name, w.labels, v, ok, w.min)
		}
	}
	if v, _ := sample(f, "hwkms_pkcs11_sessions_in_use", map[string]string{"key_id_hash": hA}); v != 0 {
		t.Errorf("sessions in use at rest = %v", v)
	}
	for _, ep := range []string{"/healthz", "/livez"} {
		resp, err := http.Get(srv.metrics + ep)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "ok\n" {
			t.Errorf("%s: %d %q", ep, resp.StatusCode, body)
		}
	}
	if err := srv.stop(); err != nil {
		t.Fatalf("serve: %v", err)
	}

	out := logs.Bytes()
	for _, want := range []string{"CKR_PIN_INCORRECT", "TPM_RC_BAD_AUTH", "CKR_GENERAL_ERROR", "config reload failed", "level=DEBUG", "keys closed"} {
		if format == "json" {
			want = strings.ReplaceAll(want, "level=DEBUG", `"level":"DEBUG"`)
		}
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("log lacks %q (the failures must be logged with their device reason)", want)
		}
	}
	secrets := map[string][]byte{
		"plaintext":             pt,
		"plaintext hex":         []byte(hex.EncodeToString(pt)),
		"plaintext HEX":         []byte(strings.ToUpper(hex.EncodeToString(pt))),
		"plaintext half hex":    []byte(hex.EncodeToString(pt[:8])),
		"plaintext base64":      []byte(base64.StdEncoding.EncodeToString(pt)),
		"plaintext base64 raw":  []byte(base64.RawStdEncoding.EncodeToString(pt)),
		"plaintext base64 url":  []byte(base64.RawURLEncoding.EncodeToString(pt)),
		"plaintext base64 half": []byte(base64.RawStdEncoding.EncodeToString(pt[:12])),
		"PIN A":                 []byte(tokA.PIN),
		"SO PIN A":              []byte(tokA.SOPIN),
		"PIN B":                 []byte(tokB.PIN),
		"SO PIN B":              []byte(tokB.SOPIN),
		"wrong PIN":             []byte(wrongPIN),
		"TPM auth":              []byte(authTValue),
		"TPM auth 2":            []byte(authUValue),
		"wrong TPM auth":        []byte(wrongAuthValue),
	}
	for name, s := range secrets {
		if bytes.Contains(out, s) {
			t.Errorf("a log line contains the %s", name)
		}
	}
	if t.Failed() {
		t.Logf("log:\n%s", out)
	}
}

// TestSIGTERMStopsGracefully sends the process a real SIGTERM while serve runs under
// the same signal context as main: serve returns nil, the socket is gone, the metrics
// listener is closed and the keys are closed.
func TestSIGTERMStopsGracefully(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	key := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek"}
	if _, err := hsm.CreateKey(context.Background(), key); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "hwkms.yaml")
	writeYAML(t, path, &config.Config{
		Socket:  config.Socket{Path: filepath.Join(dir, "kms.sock"), Mode: "0660", Group: strconv.Itoa(os.Getgid())},
		Metrics: config.Metrics{Address: "127.0.0.1:0"},
		Keys:    []config.Key{{PKCS11: &key}},
	})
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	ctx, stop := signalContext()
	defer stop()
	ready := make(chan struct{})
	addr := make(chan net.Addr, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- serveWith(ctx, cfg, path, cfg.Logger(logs), serveHooks{ready: ready, metricsAddr: func(a net.Addr) { addr <- a }})
	}()
	select {
	case <-ready:
	case err := <-errc:
		t.Fatal(err)
	}
	maddr := (<-addr).String()
	fi, err := os.Stat(cfg.Socket.Path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket: %v %v, want mode 0660", fi, err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("serve after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not stop after SIGTERM")
	}
	if _, err := os.Lstat(cfg.Socket.Path); !os.IsNotExist(err) {
		t.Fatalf("socket left after SIGTERM: %v", err)
	}
	if c, err := net.DialTimeout("tcp", maddr, time.Second); err == nil {
		c.Close()
		t.Fatal("metrics listener still open after SIGTERM")
	}
	if !bytes.Contains(logs.Bytes(), []byte("keys closed")) {
		t.Fatalf("keys not closed; log:\n%s", logs.Bytes())
	}
}

// TestKeyDestroyedWhileServing: a careless admin destroys the KEK on the token while
// hwkms serves. Requests fail with Unavailable (never wrong data), and Status says
// which: the key is gone from the device, not merely "unavailable".
func TestKeyDestroyedWhileServing(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	ctx := context.Background()
	kc := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "doomed"}
	if _, err := hsm.CreateKey(ctx, kc); err != nil {
		t.Fatal(err)
	}
	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	writeYAML(t, path, &config.Config{
		Socket:  config.Socket{Path: filepath.Join(dir, "kms.sock")},
		Health:  config.Health{Interval: config.Dur(time.Second)},
		Metrics: config.Metrics{Address: "127.0.0.1:0"},
		Keys:    []config.Key{{PKCS11: &kc}},
	})
	srv := startServeWith(t, path, slog.New(slog.NewTextHandler(io.Discard, nil)))
	c := srv.client
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	enc, err := c.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "u"})
	if err != nil {
		t.Fatal(err)
	}
	if err := hsm.DestroyKey(ctx, kc); err != nil {
		t.Fatal(err)
	}
	_, err = c.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "u"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("Decrypt after the key was destroyed: %v, want Unavailable", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := c.Status(rctx, &kmsapi.StatusRequest{})
		if err == nil && strings.Contains(st.Healthz, "(key_not_found)") {
			t.Logf("Status: %s", st.Healthz)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Status never said the key is gone: %v %v", st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
