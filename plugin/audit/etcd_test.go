package audit

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// fakeEtcd is a gRPC server that answers etcdserverpb.KV/Range from memory and records
// every method any client calls, whatever the service.
type fakeEtcd struct {
	mem     *memRanger
	mu      sync.Mutex
	methods map[string]int
	addr    string
}

func startFakeEtcd(t *testing.T, kv map[string][]byte) *fakeEtcd {
	t.Helper()
	f := &fakeEtcd{mem: newMem(kv), methods: map[string]int{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = "http://" + l.Addr().String()
	srv := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(f.handle))
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	return f
}

func (f *fakeEtcd) handle(_ any, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	f.mu.Lock()
	f.methods[method]++
	f.mu.Unlock()
	var in rawMsg
	if err := stream.RecvMsg(&in); err != nil {
		return err
	}
	if method != rangeMethod {
		return status.Error(codes.Unimplemented, method)
	}
	var key, end []byte
	var limit, rev int64
	for b := []byte(in); len(b) > 0; {
		num, typ, n := protowire.ConsumeTag(b)
		b = b[n:]
		switch typ {
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if num == 1 {
				key = v
			} else if num == 2 {
				end = v
			}
			b = b[n:]
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if num == 3 {
				limit = int64(v)
			} else if num == 4 {
				rev = int64(v)
			}
			b = b[n:]
		default:
			return status.Error(codes.InvalidArgument, "bad request")
		}
	}
	page, _ := f.mem.Range(stream.Context(), key, end, limit, rev)
	var hdr []byte
	hdr = protowire.AppendTag(hdr, 3, protowire.VarintType)
	hdr = protowire.AppendVarint(hdr, uint64(page.Revision))
	out := protowire.AppendTag(nil, 1, protowire.BytesType)
	out = protowire.AppendBytes(out, hdr)
	for _, kv := range page.KVs {
		var e []byte
		e = protowire.AppendTag(e, 1, protowire.BytesType)
		e = protowire.AppendBytes(e, kv.Key)
		e = protowire.AppendTag(e, 3, protowire.VarintType) // mod_revision, skipped by the client
		e = protowire.AppendVarint(e, 5)
		e = protowire.AppendTag(e, 5, protowire.BytesType)
		e = protowire.AppendBytes(e, kv.Value)
		out = protowire.AppendTag(out, 2, protowire.BytesType)
		out = protowire.AppendBytes(out, e)
	}
	if page.More {
		out = protowire.AppendTag(out, 3, protowire.VarintType)
		out = protowire.AppendVarint(out, 1)
	}
	msg := rawMsg(out)
	return stream.SendMsg(&msg)
}

// TestEtcdClientSendsOnlyRange: a whole audit through EtcdClient calls no RPC but
// etcdserverpb.KV/Range (no Put, DeleteRange, Txn, Compact, Watch, Lease, Auth).
func TestEtcdClientSendsOnlyRange(t *testing.T) {
	kv := map[string][]byte{}
	for i := range 1234 {
		kv[fmt.Sprintf("/registry/secrets/ns/s%05d", i)] = kmsv2("hwkms", good(fmt.Sprintf("k%d", i%3)))
	}
	f := startFakeEtcd(t, kv)
	dead := "http://" + closedAddr(t)
	cli, err := DialEtcd(EtcdConfig{Endpoints: []string{dead, f.addr}})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	r, err := Run(context.Background(), cli, testCfg(t), Options{Only: []GroupResource{{"", "secrets"}}, MaxPageKeys: 100})
	if err != nil {
		t.Fatal(err)
	}
	if r.Totals.Objects != 1234 || r.Totals.KeyIDs["k0"] != 412 || r.Revision != 42 {
		t.Errorf("totals %+v revision %d", r.Totals, r.Revision)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.methods) != 1 || f.methods[rangeMethod] < 13 {
		t.Errorf("methods called: %v, want only %s (13+ times)", f.methods, rangeMethod)
	}
}

func closedAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestEtcdClientUnreachable(t *testing.T) {
	dead := "http://" + closedAddr(t)
	cli, err := DialEtcd(EtcdConfig{Endpoints: []string{dead}})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	_, err = Run(context.Background(), cli, testCfg(t), Options{})
	if err == nil || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "--etcd-servers") {
		t.Errorf("unreachable: %v", err)
	}
}

func TestDialEtcdFlagErrors(t *testing.T) {
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.pem")
	os.WriteFile(junk, []byte("not pem"), 0o600)
	for _, tt := range []struct {
		name string
		c    EtcdConfig
		want string
	}{
		{"no servers", EtcdConfig{}, "--etcd-servers is required"},
		{"no scheme", EtcdConfig{Endpoints: []string{"127.0.0.1:2379"}}, "--etcd-servers"},
		{"unix", EtcdConfig{Endpoints: []string{"unix:///x"}}, "--etcd-servers"},
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

func TestDecodeRangeResponseMalformed(t *testing.T) {
	good := protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType),
		protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte("/k")))
	p, err := decodeRangeResponse(good)
	if err != nil || len(p.KVs) != 1 || string(p.KVs[0].Key) != "/k" {
		t.Fatalf("%+v %v", p, err)
	}
	for i := 1; i < len(good); i++ {
		if _, err := decodeRangeResponse(good[:i]); err == nil {
			t.Errorf("truncated to %d bytes: no error", i)
		}
	}
	if _, err := decodeRangeResponse([]byte{0xff, 0xff, 0xff}); err == nil {
		t.Error("garbage: no error")
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
	f := startFakeEtcd(t, kv)
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
	var limits []int64
	for _, c := range f.mem.calls {
		limits = append(limits, c.limit)
	}
	// 16, 8 and 4 keys of 1 MiB are over 4 MiB: refused, then halved.
	if len(limits) < 4 || limits[0] != 16 || limits[1] != 8 || limits[2] != 4 || limits[3] > 3 {
		t.Errorf("page sizes asked: %v, want 16, 8, 4, then fewer", limits)
	}
}
