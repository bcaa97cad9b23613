package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// apiServer is a kube-apiserver on loopback with no other control-plane component.
type apiServer struct {
	t      testing.TB
	dir    string
	bin    string
	args   []string
	proc   *proc
	URL    string
	Config *rest.Config // system:masters bearer token, serving cert pinned
	Client kubernetes.Interface
	// Kubeconfig is a kubeconfig file for kubectl with the same credentials as Config.
	Kubeconfig string
	http       *http.Client
	restarts   int
	nargs      int // len(args) before --secure-port
}

// apiServerOptions are the inputs of startAPIServer.
type apiServerOptions struct {
	Dir              string // state: certs, keys, tokens, log
	EtcdURL          string
	EncryptionConfig string // path of the EncryptionConfiguration file
	// QPS and Burst of the test's client (client-go defaults when 0).
	QPS   float32
	Burst int
	// ExtraArgs are added to kube-apiserver's flags (e.g. --runtime-config).
	ExtraArgs []string
}

// startAPIServer writes the key material kube-apiserver needs into opts.Dir, starts
// it on a free loopback port and waits until /readyz answers ok. It is stopped by PID
// in t.Cleanup.
func startAPIServer(t testing.TB, opts apiServerOptions) *apiServer {
	t.Helper()
	bin := binaryPath(t, "E2E_KUBE_APISERVER")
	dir := opts.Dir
	saKey, saPub := filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	writeRSAKeyPair(t, saKey, saPub)
	certFile, keyFile := filepath.Join(dir, "serving.crt"), filepath.Join(dir, "serving.key")
	caPEM := writeServingCert(t, certFile, keyFile)
	token := randomHex(t, 32)
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(token+`,e2e-admin,e2e-admin-uid,"system:masters"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	a := &apiServer{t: t, dir: dir, bin: bin}
	a.args = []string{
		"--etcd-servers", opts.EtcdURL,
		"--bind-address", "127.0.0.1",
		"--advertise-address", "127.0.0.1",
		"--tls-cert-file", certFile,
		"--tls-private-key-file", keyFile,
		"--token-auth-file", tokens,
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", saPub,
		"--service-account-signing-key-file", saKey,
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--encryption-provider-config", opts.EncryptionConfig,
		// As a cluster that rotates providers without restarts runs it; the KMS
		// readiness check is then /readyz/kms-providers.
		"--encryption-provider-config-automatic-reload=true",
		"--endpoint-reconciler-type", "none", // no node, no endpoints to reconcile
		"--profiling=false",
		"--v", "1",
	}
	a.args = append(a.args, opts.ExtraArgs...)
	a.Config = &rest.Config{
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: caPEM},
		QPS:             opts.QPS,
		Burst:           opts.Burst,
		Timeout:         30 * time.Second,
	}
	a.nargs = len(a.args)
	var err error
	if a.http, err = rest.HTTPClientFor(a.Config); err != nil { // for /readyz; takes a.URL per request
		t.Fatalf("http client for kube-apiserver: %v", err)
	}
	t.Cleanup(a.stop)
	for attempt := 1; ; attempt++ { // a picked port can be taken before kube-apiserver binds it
		port := strconv.Itoa(freePort(t))
		a.URL = "https://127.0.0.1:" + port
		a.Config.Host = a.URL
		a.args = append(a.args[:a.nargs:a.nargs], "--secure-port", port)
		if a.start(attempt < 3) {
			break
		}
		t.Logf("kube-apiserver could not bind port %s; trying another", port)
	}
	if a.Client, err = kubernetes.NewForConfig(a.Config); err != nil {
		t.Fatalf("client for kube-apiserver: %v", err)
	}
	a.Kubeconfig = filepath.Join(dir, "kubeconfig")
	writeKubeconfig(t, a.Kubeconfig, a.URL, token, caPEM)
	a.checkVersion()
	return a
}

// checkVersion checks that the server reports the version it was built from
// (E2E_KUBE_VERSION, set by `make e2e`), which proves the build's -ldflags took.
func (a *apiServer) checkVersion() {
	a.t.Helper()
	v, err := a.Client.Discovery().ServerVersion()
	if err != nil {
		a.t.Fatalf("kube-apiserver /version: %v", err)
	}
	if want := os.Getenv("E2E_KUBE_VERSION"); want != "" && v.GitVersion != want {
		a.t.Fatalf("kube-apiserver reports version %q, want %q (built without the version -ldflags?)", v.GitVersion, want)
	}
}

// start launches the process and waits for /readyz. If portRetry is set and the
// process exits because its port is taken, start returns false.
func (a *apiServer) start(portRetry bool) bool {
	t := a.t
	t.Helper()
	began := time.Now()
	a.proc = startProc(t, "kube-apiserver", filepath.Join(a.dir, "kube-apiserver.log"), a.bin, a.args, nil)
	err := waitFor(context.Background(), 90*time.Second, 250*time.Millisecond, a.proc, func(ctx context.Context) error {
		code, body := a.get(ctx, "/readyz")
		if code != 200 {
			return fmt.Errorf("/readyz: %d %s", code, lastLines(body, 6))
		}
		return nil
	})
	if done, _ := a.proc.exited(); err != nil && done && portRetry && strings.Contains(a.proc.logTail(30), "address already in use") {
		return false
	}
	if err != nil {
		t.Fatalf("kube-apiserver did not become ready: %v\n%s", err, a.proc.logTail(30))
	}
	t.Logf("kube-apiserver ready at %s in %s (pid %d)", a.URL, time.Since(began).Round(10*time.Millisecond), a.proc.pid())
	return true
}

// stop terminates kube-apiserver by PID (SIGTERM, then SIGKILL after 30 s).
func (a *apiServer) stop() {
	if a.proc != nil {
		a.proc.stop(syscall.SIGTERM, 30*time.Second)
	}
}

// restart stops kube-apiserver and starts it again with the same flags and port.
func (a *apiServer) restart() {
	a.t.Helper()
	a.stop()
	a.restarts++
	a.start(false)
}

// get does an authenticated GET of path and returns the status code and body; a
// transport error is code 0 with the error as body.
func (a *apiServer) get(ctx context.Context, path string) (int, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.URL+path, nil)
	if err != nil {
		return 0, err.Error()
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return 0, err.Error()
	}
	return resp.StatusCode, string(body)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// writeRSAKeyPair writes a service-account signing key (PKCS#1) and its public key.
func writeRSAKeyPair(t testing.TB, keyPath, pubPath string) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(k))
	writePEM(t, pubPath, "PUBLIC KEY", pub)
}

// writeServingCert writes a self-signed serving certificate for 127.0.0.1 and
// localhost and its key, and returns the certificate PEM for the client to trust.
func writeServingCert(t testing.TB, certPath, keyPath string) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "hwkms-e2e-apiserver"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, keyPath, "EC PRIVATE KEY", kder)
	return writePEM(t, certPath, "CERTIFICATE", der)
}

func writePEM(t testing.TB, path, typ string, der []byte) []byte {
	t.Helper()
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}
