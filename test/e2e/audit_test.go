package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
	kmsv2api "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// The audit scenario: `hwkms storage audit` reads a real etcd holding synthetic values
// of every kind kube-apiserver writes (KMS v2 under two key_ids, aescbc, identity JSON
// and protobuf, a provider the configuration no longer lists, truncated and garbage
// values) under several resource prefixes, and must count each exactly; `hwkms key
// destroy` with the storage flags refuses while objects are stored under the key and
// goes ahead once none is.

// auditEncryptionConfig lists secrets (kms v2 "hwkms", aescbc "key1", identity),
// configmaps and one custom resource (kms v2 "hwkms", identity). pods are not listed.
const auditEncryptionConfig = `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - kms: {apiVersion: v2, name: hwkms, endpoint: unix:///var/run/hwkms/kms.sock}
  - aescbc:
      keys:
      - name: key1
        secret: c2VjcmV0IGlzIHNlY3VyZSwgaXMgaXQgbm90Pz8/Pz8=
  - identity: {}
- resources: [configmaps, widgets.example.com]
  providers:
  - kms: {apiVersion: v2, name: hwkms, endpoint: unix:///var/run/hwkms/kms.sock}
  - identity: {}
`

// auditValue makes one synthetic stored value of the given sort.
func auditValue(t testing.TB, sort, keyID string) []byte {
	t.Helper()
	random := func(n int) []byte {
		b := make([]byte, n)
		rand.Read(b)
		return b
	}
	kms := func(provider, keyID string) []byte {
		return marshalKMSv2(t, provider, &kmsv2api.EncryptedObject{
			EncryptedData:          random(200),
			KeyID:                  keyID,
			EncryptedDEKSource:     random(48),
			EncryptedDEKSourceType: kmsv2api.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
			Annotations:            map[string][]byte{"kms.hwkms.io/frame": random(4)},
		})
	}
	switch sort {
	case "kms":
		return kms("hwkms", keyID)
	case "kms-old-provider":
		return kms("old", keyID)
	case "truncated":
		v := kms("hwkms", keyID)
		return v[:len(v)-60] // cuts into the DEK source
	case "aescbc":
		return append([]byte("k8s:enc:aescbc:v1:key1:"), random(64)...)
	case "json":
		return []byte(`{"kind":"Secret","apiVersion":"v1","metadata":{"name":"x"},"data":{"k":"dg=="}}`)
	case "protobuf":
		return append([]byte("k8s\x00\n\x0c\n\x02v1\x12\x06Secret"), random(20)...)
	case "garbage":
		return append([]byte{0x01, 0x02}, random(30)...)
	}
	t.Fatalf("unknown value sort %q", sort)
	return nil
}

func marshalKMSv2(t testing.TB, provider string, o *kmsv2api.EncryptedObject) []byte {
	t.Helper()
	b, err := proto.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte("k8s:enc:kms:v2:"+provider+":"), b...)
}

// fill puts n values of one sort under prefix, 100 per transaction.
func fill(t testing.TB, cli *clientv3.Client, prefix, sort, keyID string, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i := 0; i < n; i += 100 {
		var ops []clientv3.Op
		for j := i; j < min(i+100, n); j++ {
			key := fmt.Sprintf("%sns-%d/%s-%s-%06d", prefix, j%7, sort, keyID, j)
			ops = append(ops, clientv3.OpPut(key, string(auditValue(t, sort, keyID))))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			t.Fatalf("etcd put under %s: %v", prefix, err)
		}
	}
}

type auditJSON struct {
	Revision  int64 `json:"revision"`
	Resources []struct {
		Resource string `json:"resource"`
		Objects  int64  `json:"objects"`
		Counts   []struct {
			Kind       string `json:"kind"`
			Name       string `json:"name"`
			KeyID      string `json:"key_id"`
			KeyIDHash  string `json:"key_id_hash"`
			Objects    int64  `json:"objects"`
			Configured bool   `json:"configured"`
		} `json:"counts"`
		Unencrypted    int64 `json:"unencrypted"`
		OtherProviders int64 `json:"other_providers"`
		Unreadable     int64 `json:"unreadable"`
		Untracked      int64 `json:"untracked"`
	} `json:"resources"`
	Totals struct {
		Objects    int64            `json:"objects"`
		Unreadable int64            `json:"unreadable"`
		KeyIDs     map[string]int64 `json:"key_ids"`
	} `json:"totals"`
}

// runHwkms runs bin/hwkms and returns stdout, stderr and the error.
func runHwkms(t testing.TB, env []string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binaryPath(t, "E2E_HWKMS"), args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if strings.Contains(errb.String(), "goroutine ") || strings.Contains(errb.String(), "panic:") {
		t.Fatalf("hwkms %s panicked:\n%s", strings.Join(args, " "), errb.String())
	}
	return out.String(), errb.String(), err
}

func writeEncryptionConfig(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "encryption.yaml")
	if err := os.WriteFile(p, []byte(auditEncryptionConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAuditCounts(t *testing.T) {
	dir := t.TempDir()
	dumpLogsOnFailure(t, dir)
	e := startEtcd(t, dir)
	const keyA, keyB = "hwkms-kek-a", "hwkms-kek-b"
	fill(t, e.Client, "/registry/secrets/", "kms", keyA, 600)
	fill(t, e.Client, "/registry/secrets/", "kms", keyB, 400)
	fill(t, e.Client, "/registry/secrets/", "kms-old-provider", keyA, 3)
	fill(t, e.Client, "/registry/secrets/", "truncated", keyA, 7)
	fill(t, e.Client, "/registry/secrets/", "aescbc", "", 50)
	fill(t, e.Client, "/registry/secrets/", "json", "", 30)
	fill(t, e.Client, "/registry/secrets/", "protobuf", "", 20)
	fill(t, e.Client, "/registry/secrets/", "garbage", "", 5)
	fill(t, e.Client, "/registry/configmaps/", "json", "", 100)
	fill(t, e.Client, "/registry/configmaps/", "kms", keyB, 200)
	fill(t, e.Client, "/registry/example.com/widgets/", "kms", keyA, 10)
	fill(t, e.Client, "/registry/pods/", "json", "", 50)            // not in the configuration
	fill(t, e.Client, "/registry/secretsX/", "kms", keyA, 9)        // shares the prefix "secrets" but is not under secrets/
	fill(t, e.Client, "/other-apiserver/secrets/", "kms", keyA, 11) // another --etcd-prefix
	encCfg := writeEncryptionConfig(t, dir)
	base := []string{"storage", "audit", "--encryption-provider-config", encCfg, "--etcd-servers", e.URL}

	out, errOut, err := runHwkms(t, nil, append(base, "--json")...)
	if err != nil {
		t.Fatalf("storage audit --json: %v\n%s", err, errOut)
	}
	var r auditJSON
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	type row struct {
		kind, name, keyID string
		configured        bool
	}
	got := map[string]map[row]int64{}
	for _, res := range r.Resources {
		got[res.Resource] = map[row]int64{}
		for _, c := range res.Counts {
			got[res.Resource][row{c.Kind, c.Name, c.KeyID, c.Configured}] = c.Objects
			if c.KeyID != "" && c.KeyIDHash != sha256Label(c.KeyID) {
				t.Errorf("%s: key_id_hash of %s = %s, want %s", res.Resource, c.KeyID, c.KeyIDHash, sha256Label(c.KeyID))
			}
		}
	}
	want := map[string]map[row]int64{
		"secrets": {
			{"kms-v2", "hwkms", keyA, true}: 600,
			{"kms-v2", "hwkms", keyB, true}: 400,
			{"kms-v2", "old", keyA, false}:  3,
			{"aescbc", "key1", "", true}:    50,
			{"identity", "", "", true}:      50,
		},
		"configmaps": {
			{"identity", "", "", true}:      100,
			{"kms-v2", "hwkms", keyB, true}: 200,
		},
		"widgets.example.com": {
			{"kms-v2", "hwkms", keyA, true}: 10,
		},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("counts per resource:\n got %v\nwant %v", got, want)
	}
	scalars := map[string][4]int64{} // objects, unencrypted, other providers, unreadable
	for _, res := range r.Resources {
		scalars[res.Resource] = [4]int64{res.Objects, res.Unencrypted, res.OtherProviders, res.Unreadable}
		if res.Untracked != 0 {
			t.Errorf("%s: %d untracked", res.Resource, res.Untracked)
		}
	}
	wantScalars := map[string][4]int64{
		"secrets":             {1115, 50, 3, 12},
		"configmaps":          {300, 100, 0, 0},
		"widgets.example.com": {10, 0, 0, 0},
	}
	if fmt.Sprint(scalars) != fmt.Sprint(wantScalars) {
		t.Errorf("objects/unencrypted/other/unreadable:\n got %v\nwant %v", scalars, wantScalars)
	}
	if r.Totals.Objects != 1425 || r.Totals.Unreadable != 12 || r.Totals.KeyIDs[keyA] != 613 || r.Totals.KeyIDs[keyB] != 600 || len(r.Totals.KeyIDs) != 2 {
		t.Errorf("totals: %+v, want 1425 objects, 12 unreadable, %s 613, %s 600", r.Totals, keyA, keyB)
	}
	if r.Revision <= 0 {
		t.Errorf("revision %d", r.Revision)
	}

	// The table names each resource, key_id and count.
	table, errOut, err := runHwkms(t, nil, base...)
	if err != nil {
		t.Fatalf("storage audit: %v\n%s", err, errOut)
	}
	t.Logf("hwkms storage audit:\n%s", table)
	for _, s := range []string{"secrets (/registry/secrets/): 1115 objects", "configmaps (/registry/configmaps/): 300 objects",
		"widgets.example.com (/registry/example.com/widgets/): 10 objects", "TOTAL: 1425 objects", sha256Label(keyA)} {
		if !strings.Contains(table, s) {
			t.Errorf("table lacks %q", s)
		}
	}
	if strings.Contains(table, "pods") {
		t.Error("table lists pods, which the configuration does not")
	}
	if strings.Contains(errOut, "\r") {
		t.Error("progress line written to a stderr that is not a terminal")
	}

	// --resource restricts the walk; a resource the configuration does not list is an error naming the flag.
	out, errOut, err = runHwkms(t, nil, append(base, "--json", "--resource", "configmaps")...)
	if err != nil {
		t.Fatalf("--resource configmaps: %v\n%s", err, errOut)
	}
	var only auditJSON
	if err := json.Unmarshal([]byte(out), &only); err != nil || len(only.Resources) != 1 || only.Totals.Objects != 300 {
		t.Errorf("--resource configmaps: %v %+v", err, only)
	}
	_, errOut, err = runHwkms(t, nil, append(base, "--resource", "pods")...)
	if err == nil || !strings.Contains(errOut, "--resource pods") {
		t.Errorf("--resource pods: %v %q, want an error naming --resource pods", err, errOut)
	}
	// --etcd-prefix selects another apiserver's keys.
	out, _, err = runHwkms(t, nil, append(base, "--json", "--etcd-prefix", "/other-apiserver")...)
	var other auditJSON
	if err != nil || json.Unmarshal([]byte(out), &other) != nil || other.Totals.Objects != 11 {
		t.Errorf("--etcd-prefix /other-apiserver: %v %+v, want 11 objects", err, other.Totals)
	}

	// "*.*" walks every key under the prefix and names each key's resource.
	all := filepath.Join(dir, "all.yaml")
	if err := os.WriteFile(all, []byte("resources: [{resources: ['*.*'], providers: [{kms: {apiVersion: v2, name: hwkms}}, {identity: {}}]}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, err = runHwkms(t, nil, "storage", "audit", "--json", "--encryption-provider-config", all, "--etcd-servers", e.URL)
	var wild auditJSON
	if err != nil || json.Unmarshal([]byte(out), &wild) != nil {
		t.Fatalf("*.*: %v %s", err, errOut)
	}
	perRes := map[string]int64{}
	for _, res := range wild.Resources {
		perRes[res.Resource] = res.Objects
	}
	if want := map[string]int64{"secrets": 1115, "configmaps": 300, "widgets.example.com": 10, "pods": 50, "secretsX": 9}; fmt.Sprint(perRes) != fmt.Sprint(want) || wild.Totals.Objects != 1484 {
		t.Errorf("*.*: %v (total %d), want %v (1484)", perRes, wild.Totals.Objects, want)
	}

	// Unreachable endpoint: a clear error naming it, non-zero exit.
	dead := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
	start := time.Now()
	_, errOut, err = runHwkms(t, nil, "storage", "audit", "--encryption-provider-config", encCfg, "--etcd-servers", dead, "--etcd-request-timeout", "5s")
	if err == nil || !strings.Contains(errOut, dead) || !strings.Contains(errOut, "--etcd-servers") {
		t.Errorf("unreachable etcd: %v %q, want an error naming %s and --etcd-servers", err, errOut, dead)
	}
	t.Logf("unreachable endpoint error after %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(errOut))
	// A missing configuration file names the flag.
	_, errOut, err = runHwkms(t, nil, "storage", "audit", "--encryption-provider-config", filepath.Join(dir, "nope.yaml"), "--etcd-servers", e.URL)
	if err == nil || !strings.Contains(errOut, "--encryption-provider-config") {
		t.Errorf("missing config: %v %q", err, errOut)
	}
}

func sha256Label(keyID string) string {
	out, err := exec.Command("sh", "-c", `printf %s "$1" | sha256sum | cut -d' ' -f1`, "sh", keyID).Output()
	if err != nil {
		panic(err)
	}
	return "sha256:" + strings.TrimSpace(string(out))
}

// TestAuditTLS: etcd with TLS client authentication; the audit connects with the right
// CA and client certificate and fails clearly with a CA that did not sign etcd's
// certificate, or without a client certificate.
func TestAuditTLS(t *testing.T) {
	dir := t.TempDir()
	dumpLogsOnFailure(t, dir)
	pki := newTestPKI(t, dir, "ca")
	wrong := newTestPKI(t, filepath.Join(dir, "wrong"), "wrong-ca")
	e := startEtcdTLS(t, dir, pki)
	fill(t, e.Client, "/registry/secrets/", "kms", "tls-key", 120)
	encCfg := writeEncryptionConfig(t, dir)
	args := func(ca string, client bool) []string {
		a := []string{"storage", "audit", "--json", "--encryption-provider-config", encCfg, "--etcd-servers", e.URL,
			"--etcd-cafile", ca, "--etcd-request-timeout", "5s"}
		if client {
			a = append(a, "--etcd-certfile", pki.clientCert, "--etcd-keyfile", pki.clientKey)
		}
		return a
	}
	out, errOut, err := runHwkms(t, nil, args(pki.caFile, true)...)
	var r auditJSON
	if err != nil || json.Unmarshal([]byte(out), &r) != nil || r.Totals.KeyIDs["tls-key"] != 120 {
		t.Fatalf("audit over TLS: %v %s %+v", err, errOut, r.Totals)
	}
	_, errOut, err = runHwkms(t, nil, args(wrong.caFile, true)...)
	if err == nil || !strings.Contains(errOut, e.URL) || !strings.Contains(errOut, "certificate") || !strings.Contains(errOut, "--etcd-cafile") {
		t.Errorf("wrong CA: %v %q, want an error naming the endpoint, the certificate and --etcd-cafile", err, errOut)
	}
	t.Logf("wrong CA: %s", strings.TrimSpace(errOut))
	_, errOut, err = runHwkms(t, nil, args(pki.caFile, false)...)
	if err == nil || !strings.Contains(errOut, e.URL) {
		t.Errorf("no client certificate: %v %q, want an error naming the endpoint", err, errOut)
	}
	t.Logf("no client certificate: %s", strings.TrimSpace(errOut))
	// Plain http to a TLS endpoint flag mix is refused before connecting.
	_, errOut, err = runHwkms(t, nil, "storage", "audit", "--encryption-provider-config", encCfg,
		"--etcd-servers", strings.Replace(e.URL, "https", "http", 1), "--etcd-cafile", pki.caFile)
	if err == nil || !strings.Contains(errOut, "https://") {
		t.Errorf("http endpoint with --etcd-cafile: %v %q", err, errOut)
	}
}

type testPKI struct {
	caFile, serverCert, serverKey, clientCert, clientKey string
}

// newTestPKI writes a CA, a server certificate for 127.0.0.1 and a client certificate.
func newTestPKI(t testing.TB, dir, name string) testPKI {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	p := testPKI{caFile: filepath.Join(dir, "ca.crt")}
	writePEM(t, p.caFile, "CERTIFICATE", caDER)
	leaf := func(file string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: file},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(k)
		c, kf := filepath.Join(dir, file+".crt"), filepath.Join(dir, file+".key")
		writePEM(t, c, "CERTIFICATE", der)
		writePEM(t, kf, "PRIVATE KEY", kder)
		return c, kf
	}
	p.serverCert, p.serverKey = leaf("server", 2, x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = leaf("client", 3, x509.ExtKeyUsageClientAuth)
	return p
}

// startEtcdTLS starts etcd serving https with client certificate authentication.
func startEtcdTLS(t testing.TB, dir string, p testPKI) *etcdServer {
	t.Helper()
	bin := binaryPath(t, "E2E_ETCD")
	cert, err := tls.LoadX509KeyPair(p.clientCert, p.clientKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(p.caFile)
	pool.AppendCertsFromPEM(caPEM)
	for attempt := range 3 {
		client := "https://127.0.0.1:" + strconv.Itoa(freePort(t))
		peer := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
		pr := startProc(t, "etcd-tls", filepath.Join(dir, "etcd.log"), bin, []string{
			"--name", "e2e", "--data-dir", filepath.Join(dir, fmt.Sprintf("etcd-data-%d", attempt)),
			"--listen-client-urls", client, "--advertise-client-urls", client,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", "e2e=" + peer, "--listen-metrics-urls", "",
			"--cert-file", p.serverCert, "--key-file", p.serverKey,
			"--trusted-ca-file", p.caFile, "--client-cert-auth",
			"--log-level", "warn", "--unsafe-no-fsync",
		}, nil)
		t.Cleanup(func() { pr.stop(syscall.SIGTERM, 10*time.Second) })
		cli, err := clientv3.New(clientv3.Config{
			Endpoints: []string{client}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
			TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
		})
		if err != nil {
			t.Fatalf("etcd client: %v", err)
		}
		t.Cleanup(func() { cli.Close() })
		err = waitFor(context.Background(), 30*time.Second, 100*time.Millisecond, pr, func(ctx context.Context) error {
			_, err := cli.Get(ctx, "/e2e-ready-probe")
			return err
		})
		if err == nil {
			return &etcdServer{proc: pr, URL: client, Client: cli}
		}
		pr.stop(syscall.SIGKILL, time.Second)
	}
	t.Fatal("etcd with TLS did not become ready")
	return nil
}

// TestAuditGuardsDestroy: `hwkms key destroy` with the storage flags refuses while
// objects are stored under the key, refuses an override that does not name their
// number, and destroys the key once no object is stored under it.
func TestAuditGuardsDestroy(t *testing.T) {
	dir := t.TempDir()
	dumpLogsOnFailure(t, dir)
	e := startEtcd(t, dir)
	dev := newDevice(t, "pkcs11", mkdir(t, filepath.Join(dir, "dev")))
	h := newHwkms(t, dev, dir, 0, 1)
	oldKey, newKey := h.createKey(0), h.createKey(1)
	h.writeConfig(1) // the old key is retired: no longer in the config
	fill(t, e.Client, "/registry/secrets/", "kms", oldKey, 25)
	fill(t, e.Client, "/registry/secrets/", "kms", newKey, 40)
	encCfg := writeEncryptionConfig(t, dir)
	destroy := func(extra ...string) (string, error) {
		args := append([]string{"key", "destroy", "--config", h.Config, "--key-id", oldKey, "--confirm", oldKey,
			"--etcd-servers", e.URL, "--encryption-provider-config", encCfg}, extra...)
		out, errOut, err := runHwkms(t, dev.env, args...)
		return out + errOut, err
	}
	out, err := destroy()
	if err == nil || !strings.Contains(out, "25 object(s) stored under key_id "+oldKey) || !strings.Contains(out, "--destroy-with-objects=25") {
		t.Fatalf("destroy with 25 objects under the key: %v\n%s", err, out)
	}
	t.Logf("refused: %s", strings.TrimSpace(out))
	if out, err := destroy("--destroy-with-objects=24"); err == nil || !strings.Contains(out, "does not match") {
		t.Fatalf("destroy with a wrong override: %v\n%s", err, out)
	}
	if keys := h.run(time.Minute, "key", "list", "--config", h.Config); !strings.Contains(keys, newKey) {
		t.Fatalf("key list: %s", keys)
	}
	// Migrate: rewrite the 25 values under the new key (what kubectl replace does).
	ctx := context.Background()
	resp, err := e.Client.Get(ctx, "/registry/secrets/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	migrated := 0
	for _, kv := range resp.Kvs {
		if strings.Contains(string(kv.Key), oldKey) {
			e.put(t, string(kv.Key), auditValue(t, "kms", newKey))
			migrated++
		}
	}
	if migrated != 25 {
		t.Fatalf("migrated %d values, want 25", migrated)
	}
	out, err = destroy()
	if err != nil || !strings.Contains(out, "destroyed key_id "+oldKey) || !strings.Contains(out, "0 object(s) under key_id") {
		t.Fatalf("destroy after migration: %v\n%s", err, out)
	}
	t.Logf("allowed: %s", strings.TrimSpace(out))
	// The key is gone from the token: destroying it again finds nothing.
	if out, err := destroy(); err == nil {
		t.Fatalf("second destroy succeeded:\n%s", out)
	}
}

// TestAuditScale audits 12,000 synthetic Secrets (KMS v2, 1 KiB of ciphertext each,
// under two key_ids) and then 400 Secrets of 256 KiB, and reports the wall time and the
// peak RSS (GNU time) of each `hwkms storage audit` run: memory must not
// grow with the number or size of the values (pages are sized to about 1 MiB, and a
// page over 4 MiB is refused before it is read and asked again with fewer keys).
// docs/BENCHMARKS.md records its output.
func TestAuditScale(t *testing.T) {
	dir := t.TempDir()
	dumpLogsOnFailure(t, dir)
	e := startEtcd(t, dir)
	encCfg := writeEncryptionConfig(t, dir)
	ctx := context.Background()
	put := func(prefix, keyID string, n, size, perTxn int) {
		t.Helper()
		for i := 0; i < n; i += perTxn {
			var ops []clientv3.Op
			for j := i; j < min(i+perTxn, n); j++ {
				data := make([]byte, size)
				rand.Read(data)
				v := marshalKMSv2(t, "hwkms", &kmsv2api.EncryptedObject{
					EncryptedData: data, KeyID: keyID, EncryptedDEKSource: data[:48],
					EncryptedDEKSourceType: kmsv2api.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
				})
				ops = append(ops, clientv3.OpPut(fmt.Sprintf("%sns-%02d/s-%s-%06d", prefix, j%50, keyID, j), string(v)))
			}
			if _, err := e.Client.Txn(ctx).Then(ops...).Commit(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Peak RSS comes from GNU time (%M: the child's ru_maxrss). The rusage Go's own
	// os/exec reports would not do: Go starts children with CLONE_VM|CLONE_VFORK, and
	// Linux folds the memory the child shared with this (large) test process before
	// exec into the child's ru_maxrss. time forks, so its child starts from time's few
	// pages.
	timeBin, _ := exec.LookPath("/usr/bin/time")
	if timeBin == "" {
		t.Log("/usr/bin/time (GNU time) not found: counts are checked, peak RSS is not measured")
	}
	var base float64
	measure := func(what string, want map[string]int64) float64 {
		t.Helper()
		args := []string{binaryPath(t, "E2E_HWKMS"), "storage", "audit", "--json",
			"--encryption-provider-config", encCfg, "--etcd-servers", e.URL, "--resource", "secrets"}
		ruFile := filepath.Join(dir, "rusage")
		if timeBin != "" {
			args = append([]string{timeBin, "-o", ruFile, "-f", "%M %U %S"}, args...)
		}
		cmd := exec.Command(args[0], args[1:]...)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		start := time.Now()
		if err := cmd.Run(); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, errb.String())
		}
		wall := time.Since(start)
		var r auditJSON
		if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
			t.Fatal(err)
		}
		for k, n := range want {
			if r.Totals.KeyIDs[k] != n {
				t.Errorf("%s: %d objects under %s, want %d", what, r.Totals.KeyIDs[k], k, n)
			}
		}
		if timeBin == "" {
			t.Logf("%s: %d objects in %s", what, r.Totals.Objects, wall.Round(time.Millisecond))
			return 0
		}
		ru, err := os.ReadFile(ruFile)
		if err != nil {
			t.Fatal(err)
		}
		var kib int64
		var user, sys float64
		if _, err := fmt.Sscanf(string(ru), "%d %f %f", &kib, &user, &sys); err != nil {
			t.Fatalf("GNU time output %q: %v", ru, err)
		}
		rss := float64(kib) / 1024
		t.Logf("%s: %d objects in %s (user %.2f s, sys %.2f s), peak RSS %.1f MiB",
			what, r.Totals.Objects, wall.Round(time.Millisecond), user, sys, rss)
		if base > 0 && rss > base+24 {
			t.Errorf("%s: peak RSS %.1f MiB, %.1f MiB over the empty audit's, want <= 24 MiB more (bounded memory)", what, rss, rss-base)
		}
		return rss
	}
	base = measure("empty etcd (baseline: the process and its connection)", nil)
	put("/registry/secrets/", "kek-old", 4000, 1024, 100)
	put("/registry/secrets/", "kek-new", 8000, 1024, 100)
	measure("12,000 Secrets of 1 KiB", map[string]int64{"kek-old": 4000, "kek-new": 8000})
	if testing.Short() {
		return
	}
	put("/registry/secrets/big-", "kek-big", 400, 256<<10, 4)
	measure("12,000 Secrets of 1 KiB + 400 of 256 KiB (112 MiB of values)", map[string]int64{"kek-old": 4000, "kek-new": 8000, "kek-big": 400})
}
