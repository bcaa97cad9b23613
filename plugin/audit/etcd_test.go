package audit

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// fakeEtcd is an in-process etcd gRPC server: etcdserverpb.KV is registered and answers
// Range from a memRanger; every other method of KV, and any method of any other service
// (Maintenance, Cluster, Auth, Lease, Watch, gRPC health), is answered Unimplemented.
// Every method any client calls is recorded, whatever the service.
type fakeEtcd struct {
	pb.UnimplementedKVServer
	addr string

	mu      sync.Mutex
	mem     *memRanger
	methods map[string]int
	// answer, if set, replaces the n-th Range's answer (1-based) when it returns a
	// non-nil response or error.
	answer func(n int, req *pb.RangeRequest) (*pb.RangeResponse, error)
}

type fakeOptions struct {
	tls *tls.Config // serve https with it
	// anyMethod: do not fail the test on a method other than KV/Range (for the test
	// of the recorder itself).
	anyMethod bool
}

func startFakeEtcd(t *testing.T, kv map[string][]byte, o fakeOptions) *fakeEtcd {
	t.Helper()
	f := &fakeEtcd{mem: newMem(kv), methods: map[string]int{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = "http://" + l.Addr().String()
	opts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			f.record(info.FullMethod)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			f.record(info.FullMethod)
			return h(srv, ss)
		}),
		grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
			return status.Error(codes.Unimplemented, "not an etcd method the fake serves")
		}),
	}
	if o.tls != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(o.tls)))
		f.addr = "https://" + l.Addr().String()
	}
	srv := grpc.NewServer(opts...)
	pb.RegisterKVServer(srv, f)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	if !o.anyMethod {
		// Runs before srv.Stop and after the test's own deferred Close calls.
		t.Cleanup(func() { f.assertOnlyRange(t) })
	}
	return f
}

func (f *fakeEtcd) record(method string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.methods[method]++
}

// assertOnlyRange fails the test if any method but etcdserverpb.KV/Range was called.
func (f *fakeEtcd) assertOnlyRange(t *testing.T) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	for m, n := range f.methods {
		if m != pb.KV_Range_FullMethodName {
			t.Errorf("the fake etcd received %s (%d times): the audit may call only %s", m, n, pb.KV_Range_FullMethodName)
		}
	}
}

func (f *fakeEtcd) rangeCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.methods[pb.KV_Range_FullMethodName]
}

func (f *fakeEtcd) Range(ctx context.Context, req *pb.RangeRequest) (*pb.RangeResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	page, _ := f.mem.Range(ctx, req.Key, req.RangeEnd, req.Limit, req.Revision)
	if f.answer != nil {
		if resp, err := f.answer(len(f.mem.calls), req); resp != nil || err != nil {
			return resp, err
		}
	}
	resp := &pb.RangeResponse{Header: &pb.ResponseHeader{Revision: page.Revision, ClusterId: 1, MemberId: 2}, More: page.More, Count: int64(len(page.KVs))}
	for _, kv := range page.KVs {
		resp.Kvs = append(resp.Kvs, &mvccpb.KeyValue{Key: kv.Key, Value: kv.Value, ModRevision: 5, CreateRevision: 3, Version: 1})
	}
	return resp, nil
}

// TestEtcdClientSendsOnlyRange: a whole audit through EtcdClient, with an unreachable
// endpoint listed first, counts every value (bad ones as unreadable) and calls no RPC
// but etcdserverpb.KV/Range: no Put, DeleteRange, Txn, Compact, Watch, Lease, Auth,
// MemberList or Status.
func TestEtcdClientSendsOnlyRange(t *testing.T) {
	kv := map[string][]byte{}
	for i := range 1234 {
		kv[fmt.Sprintf("/registry/secrets/ns/s%05d", i)] = kmsv2("hwkms", good(fmt.Sprintf("k%d", i%3)))
	}
	truncated := kmsv2("hwkms", good("k0"))
	kv["/registry/secrets/bad/truncated"] = truncated[:len(truncated)-5]
	kv["/registry/secrets/bad/not-an-encrypted-object"] = []byte("k8s:enc:kms:v2:hwkms:\xff\xff\xff not protobuf")
	kv["/registry/secrets/bad/garbage"] = []byte("\x01\x02\x03 garbage")
	f := startFakeEtcd(t, kv, fakeOptions{})
	dead := "http://" + closedAddr(t)
	cli, err := DialEtcd(EtcdConfig{Endpoints: []string{dead, f.addr}})
	if err != nil {
		t.Fatal(err)
	}
	r, err := Run(context.Background(), cli, testCfg(t), Options{Only: []GroupResource{{"", "secrets"}}, MaxPageKeys: 100})
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if r.Totals.Objects != 1237 || r.Totals.Unreadable != 3 || r.Totals.KeyIDs["k0"] != 412 || r.Revision != 42 {
		t.Errorf("totals %+v revision %d, want 1237 objects, 3 unreadable, 412 under k0, revision 42", r.Totals, r.Revision)
	}
	// Every page after the first is read at the first page's revision and resumes after
	// the previous page's last key.
	f.mu.Lock()
	calls := append([]rangeCall(nil), f.mem.calls...)
	f.mu.Unlock()
	for i, c := range calls {
		if c.limit < 1 || c.limit > 100 || c.end != "/registry/secrets0" {
			t.Errorf("call %d: %+v, want a limit in [1, 100] and the end of /registry/secrets/", i, c)
		}
		if i > 0 && (c.rev != 42 || !strings.HasSuffix(c.key, "\x00")) {
			t.Errorf("call %d: %+v, want revision 42 and a key after the last one returned", i, c)
		}
	}
	if n := f.rangeCalls(); n < 13 || n != len(calls) {
		t.Errorf("%d Range RPCs (%d pages), want 13 or more for 1,237 keys in pages of at most 100", n, len(calls))
	}
	f.assertOnlyRange(t)
}

// TestFakeEtcdRecordsEveryMethod: the recorder the other tests rely on sees the calls
// the audit must never make, unary and streaming, on KV and on other services.
func TestFakeEtcdRecordsEveryMethod(t *testing.T) {
	f := startFakeEtcd(t, nil, fakeOptions{anyMethod: true})
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{f.addr}, Logger: zap.NewNop(), MaxUnaryRetries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/k", "v"); err == nil {
		t.Error("Put: the fake accepted it")
	}
	cli.MemberList(ctx)
	cli.Status(ctx, f.addr)
	cli.Lease.Grant(ctx, 10)
	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	for range cli.Watch(wctx, "/k") { // Unimplemented closes the stream; the watcher retries until wctx ends
	}
	wcancel()
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range []string{pb.KV_Put_FullMethodName, pb.Cluster_MemberList_FullMethodName, pb.Maintenance_Status_FullMethodName,
		pb.Lease_LeaseGrant_FullMethodName, pb.Watch_Watch_FullMethodName} {
		if f.methods[m] == 0 {
			t.Errorf("%s not recorded: %v", m, f.methods)
		}
	}
}

func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// silentAddr accepts TCP connections and never answers on them.
func silentAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String()
}

// TestEtcdClientUnreachable: an endpoint that refuses connections, or accepts them and
// never speaks, gives an error naming the endpoint, the flag and the cause, well
// before the request's deadline.
func TestEtcdClientUnreachable(t *testing.T) {
	for _, tt := range []struct {
		name, endpoint, cause string
	}{
		{"refused", "http://" + closedAddr(t), "connection refused"},
		{"silent", "http://" + silentAddr(t), "server preface"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cli, err := DialEtcd(EtcdConfig{Endpoints: []string{tt.endpoint}, RequestTimeout: 20 * time.Second, DialTimeout: 500 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			start := time.Now()
			_, err = Run(context.Background(), cli, testCfg(t), Options{})
			took := time.Since(start)
			if err == nil || !strings.Contains(err.Error(), tt.endpoint) || !strings.Contains(err.Error(), "--etcd-servers") || !strings.Contains(err.Error(), tt.cause) {
				t.Errorf("error %v, want one naming %s, --etcd-servers and %q", err, tt.endpoint, tt.cause)
			}
			if took > 10*time.Second {
				t.Errorf("took %s, want well under the 20 s request timeout", took)
			}
			t.Logf("after %s: %v", took.Round(time.Millisecond), err)
		})
	}
}

// TestEtcdClientTLS: https with client certificate authentication, as kube-apiserver
// reaches etcd; a CA that did not sign the server's certificate, or no client
// certificate, fails with an error naming the endpoint and the cause.
func TestEtcdClientTLS(t *testing.T) {
	dir := t.TempDir()
	pki := newPKI(t, dir, "ca")
	wrong := newPKI(t, filepath.Join(dir, "wrong"), "wrong-ca")
	serverCert, err := tls.LoadX509KeyPair(pki.serverCert, pki.serverKey)
	if err != nil {
		t.Fatal(err)
	}
	f := startFakeEtcd(t, map[string][]byte{"/registry/secrets/ns/a": kmsv2("hwkms", good("tls-key"))}, fakeOptions{tls: &tls.Config{
		Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.pool,
	}})
	audit := func(c EtcdConfig) (*Result, error) {
		c.Endpoints, c.RequestTimeout = []string{f.addr}, 10*time.Second
		cli, err := DialEtcd(c)
		if err != nil {
			return nil, err
		}
		defer cli.Close()
		return Run(context.Background(), cli, testCfg(t), Options{Only: []GroupResource{{"", "secrets"}}})
	}
	r, err := audit(EtcdConfig{CAFile: pki.ca, CertFile: pki.clientCert, KeyFile: pki.clientKey})
	if err != nil || r.Totals.KeyIDs["tls-key"] != 1 {
		t.Fatalf("audit over TLS: %v %+v", err, r)
	}
	for _, tt := range []struct {
		name  string
		c     EtcdConfig
		cause string
	}{
		{"wrong CA", EtcdConfig{CAFile: wrong.ca, CertFile: pki.clientCert, KeyFile: pki.clientKey}, "certificate"},
		// With TLS 1.3 the client's handshake completes before the server checks its
		// certificate: the cause is the server's alert ("certificate required") or,
		// when the client writes first, a broken pipe.
		{"no client certificate", EtcdConfig{CAFile: pki.ca}, ""},
		{"client certificate of another CA", EtcdConfig{CAFile: pki.ca, CertFile: wrong.clientCert, KeyFile: wrong.clientKey}, ""},
	} {
		start := time.Now()
		_, err := audit(tt.c)
		if err == nil || !strings.Contains(err.Error(), f.addr) || !strings.Contains(err.Error(), tt.cause) || !strings.Contains(err.Error(), "--etcd-cafile") {
			t.Errorf("%s: %v, want an error naming %s, %q and --etcd-cafile", tt.name, err, f.addr, tt.cause)
		}
		t.Logf("%s, after %s: %v", tt.name, time.Since(start).Round(time.Millisecond), err)
	}
	// The key file is a secret: readable by others, it is refused.
	if err := os.Chmod(pki.clientKey, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := audit(EtcdConfig{CAFile: pki.ca, CertFile: pki.clientCert, KeyFile: pki.clientKey}); err == nil || !strings.Contains(err.Error(), "--etcd-keyfile") {
		t.Errorf("key file readable by others: %v", err)
	}
}

type pki struct {
	ca, serverCert, serverKey, clientCert, clientKey string
	pool                                             *x509.CertPool
}

// newPKI writes a CA, a server certificate for 127.0.0.1 and a client certificate.
func newPKI(t *testing.T, dir, name string) pki {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(file, typ string, der []byte) string {
		p := filepath.Join(dir, file)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	p := pki{ca: write("ca.crt", "CERTIFICATE", caDER), pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	leaf := func(file string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: file},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return write(file+".crt", "CERTIFICATE", der), write(file+".key", "PRIVATE KEY", kder)
	}
	p.serverCert, p.serverKey = leaf("server", 2, x509.ExtKeyUsageServerAuth)
	p.clientCert, p.clientKey = leaf("client", 3, x509.ExtKeyUsageClientAuth)
	return p
}

func TestDialEtcdFlagErrors(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		c    EtcdConfig
		want string
	}{
		{"no servers", EtcdConfig{}, "--etcd-servers is required"},
		{"no scheme", EtcdConfig{Endpoints: []string{"127.0.0.1:2379"}}, "--etcd-servers"},
		{"unix", EtcdConfig{Endpoints: []string{"unix:///x"}}, "--etcd-servers"},
		{"mixed schemes", EtcdConfig{Endpoints: []string{"https://a:1", "http://b:1"}}, "one scheme"},
		{"cert without key", EtcdConfig{Endpoints: []string{"https://a:1"}, CertFile: "c"}, "--etcd-keyfile"},
		{"http with CA", EtcdConfig{Endpoints: []string{"http://a:1"}, CAFile: junk}, "https://"},
		{"missing CA", EtcdConfig{Endpoints: []string{"https://a:1"}, CAFile: filepath.Join(dir, "nope")}, "--etcd-cafile"},
		{"junk CA", EtcdConfig{Endpoints: []string{"https://a:1"}, CAFile: junk}, "--etcd-cafile"},
		{"junk cert", EtcdConfig{Endpoints: []string{"https://a:1"}, CertFile: junk, KeyFile: junk}, "--etcd-certfile"},
	} {
		if _, err := DialEtcd(tt.c); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
	}
}

// TestEtcdClientServerErrors: etcd's own errors during the walk are reported, never
// retried into a hang: a compacted revision says to run again, an answer without a
// header (no revision to pin the walk to) is refused.
func TestEtcdClientServerErrors(t *testing.T) {
	kv := map[string][]byte{}
	for i := range 40 {
		kv[fmt.Sprintf("/registry/secrets/ns/s%02d", i)] = kmsv2("hwkms", good("k"))
	}
	for _, tt := range []struct {
		name   string
		answer func(n int, req *pb.RangeRequest) (*pb.RangeResponse, error)
		want   string
		is     error
	}{
		{"compacted", func(n int, req *pb.RangeRequest) (*pb.RangeResponse, error) {
			if n == 2 {
				return nil, rpctypes.ErrGRPCCompacted
			}
			return nil, nil
		}, "compacted revision 42 during the audit", rpctypes.ErrCompacted},
		{"no header", func(int, *pb.RangeRequest) (*pb.RangeResponse, error) {
			return &pb.RangeResponse{Kvs: []*mvccpb.KeyValue{{Key: []byte("/registry/secrets/ns/s00")}}}, nil
		}, "without a header", nil},
		{"permission denied", func(int, *pb.RangeRequest) (*pb.RangeResponse, error) {
			return nil, rpctypes.ErrGRPCPermissionDenied
		}, "permission denied", rpctypes.ErrPermissionDenied},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := startFakeEtcd(t, kv, fakeOptions{})
			f.answer = tt.answer
			cli, err := DialEtcd(EtcdConfig{Endpoints: []string{f.addr}, RequestTimeout: 10 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			_, err = Run(context.Background(), cli, testCfg(t), Options{Only: []GroupResource{{"", "secrets"}}})
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), f.addr) || (tt.is != nil && !errors.Is(err, tt.is)) {
				t.Errorf("error %v, want one naming %s with %q", err, f.addr, tt.want)
			}
			if n := f.rangeCalls(); n > 2 {
				t.Errorf("%d Range RPCs: a server error was retried", n)
			}
		})
	}
}

// TestEtcdClientShrinksOversizedPages: pages over pageRecvBytes fail on their length
// prefix with ResourceExhausted, which Run answers by asking for fewer keys.
func TestEtcdClientShrinksOversizedPages(t *testing.T) {
	kv := map[string][]byte{}
	body := good("big")
	body.data = make([]byte, 1<<20)
	v := kmsv2("hwkms", body)
	for i := range 12 {
		kv[fmt.Sprintf("/registry/secrets/ns/s%02d", i)] = v
	}
	f := startFakeEtcd(t, kv, fakeOptions{})
	cli, err := DialEtcd(EtcdConfig{Endpoints: []string{f.addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	r, err := Run(context.Background(), cli, testCfg(t), Options{Only: []GroupResource{{"", "secrets"}}})
	if err != nil {
		t.Fatal(err)
	}
	if r.Totals.KeyIDs["big"] != 12 {
		t.Errorf("counted %v", r.Totals.KeyIDs)
	}
	f.mu.Lock()
	var limits []int64
	for _, c := range f.mem.calls {
		limits = append(limits, c.limit)
	}
	f.mu.Unlock()
	// 16, 8 and 4 keys of 1 MiB are over 4 MiB: refused, then halved.
	if len(limits) < 4 || limits[0] != 16 || limits[1] != 8 || limits[2] != 4 || limits[3] > 3 {
		t.Errorf("page sizes asked: %v, want 16, 8, 4, then fewer", limits)
	}
}
