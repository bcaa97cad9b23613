package plugin

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
	"github.com/hwkms/hwkms/plugin/kek/kektest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
	"k8s.io/kms/pkg/service"
)

// The floors of `make bench` (docs/BENCHMARKS.md) that need no device: the bare gRPC
// unary round trip of a KMS v2 request over a unix socket, served exactly the way Serve
// serves hwkms but by a service that does nothing, and in-process AES-256-GCM of a
// 32-byte seed. Besides ns/op (a mean) the socket benchmarks report p50-ns and p99-ns,
// because the targets compare medians and tails.

// noopService answers every KMS v2 call at once with fixed values, as fast as a
// service.Service can. It is the "bare gRPC" floor.
type noopService struct{ ct, pt []byte }

func (n noopService) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: StatusVersion, Healthz: "ok", KeyID: "noop"}, nil
}

func (n noopService) Encrypt(context.Context, string, []byte) (*service.EncryptResponse, error) {
	return &service.EncryptResponse{Ciphertext: n.ct, KeyID: "noop"}, nil
}

func (n noopService) Decrypt(context.Context, string, *service.DecryptRequest) ([]byte, error) {
	return n.pt, nil
}

// nopKEK returns a KEK that does no cryptography: the plugin's own cost over the
// socket, without a device, is BenchmarkSocket minus BenchmarkGRPC.
func nopKEK() *kektest.Fake { return kektest.NewFake("nop", kektest.FakeNoCrypto()) }

// benchServeEnv, when set to "<kind>:<socket>" in a test binary's environment, makes
// TestBenchServer serve that kind of service on the socket until the process is killed.
// The socket benchmarks run their server in such a child process so that, like
// `hwkms bench` against `hwkms serve`, client and server are separate processes: in one
// process a round trip skips the cross-process wakeups and measures ~4x faster.
const benchServeEnv = "HWKMS_BENCH_SERVE"

// TestBenchServer is not a test: it is the server process of the socket benchmarks.
func TestBenchServer(t *testing.T) {
	v := os.Getenv(benchServeEnv)
	if v == "" {
		t.Skip("server process of the socket benchmarks; runs only under " + benchServeEnv)
	}
	kind, sock, _ := strings.Cut(v, ":")
	var svc service.Service
	switch kind {
	case "noop":
		svc = noopService{ct: make([]byte, 2+1+12+32+16), pt: make([]byte, 32)}
	case "service":
		ring, err := NewKeyring(nopKEK())
		if err != nil {
			t.Fatal(err)
		}
		s := NewService(ring, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn}))})
		s.ProbeNow(context.Background())
		svc = s
	default:
		t.Fatalf("%s=%q: unknown kind", benchServeEnv, v)
	}
	if err := Serve(context.Background(), svc, SocketOptions{Path: sock, Timeout: 3 * time.Second}, nil); err != nil {
		t.Fatal(err)
	}
}

// serveBench starts this test binary as a server process of the given kind ("noop" or
// "service") and returns a client connected the way `hwkms bench` connects, once the
// server answers.
func serveBench(b *testing.B, kind string) kmsapi.KeyManagementServiceClient {
	b.Helper()
	sock := filepath.Join(shortTempDir(b), "kms.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^TestBenchServer$", "-test.count=1")
	cmd.Env = append(os.Environ(), benchServeEnv+"="+kind+":"+sock)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	c := kmsapi.NewKeyManagementServiceClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Status(ctx, &kmsapi.StatusRequest{}, grpc.WaitForReady(true))
		cancel()
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			b.Fatalf("bench server %s never answered: %v", kind, err)
		}
	}
}

// shortTempDir is a temp dir whose socket paths stay under the 107-byte limit.
func shortTempDir(b *testing.B) string {
	b.Helper()
	d, err := filepath.EvalSymlinks(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	if len(d) > 80 {
		b.Skipf("temp dir %s too long for a unix socket", d)
	}
	return d
}

// benchRPC runs call sequentially, each under a 3 s deadline like the apiserver's,
// and reports its p50 and p99 besides the mean.
func benchRPC(b *testing.B, call func(ctx context.Context) error) {
	b.Helper()
	for range 200 { // warm up the connection and the server's goroutines
		if err := call(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err := call(ctx)
		cancel()
		lat = append(lat, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2]), "p50-ns")
	b.ReportMetric(float64(lat[min(len(lat)-1, len(lat)*99/100)]), "p99-ns")
}

// rpcs are the three KMS v2 calls with kube-apiserver-sized messages: a 32-byte seed,
// a ~50-byte ciphertext and a 43-character key_id.
func rpcs(c kmsapi.KeyManagementServiceClient, ct []byte, keyID string) map[string]func(context.Context) error {
	seed := make([]byte, 32)
	return map[string]func(context.Context) error{
		"Encrypt": func(ctx context.Context) error {
			_, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: "bench"})
			return err
		},
		"Decrypt": func(ctx context.Context) error {
			_, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ct, KeyId: keyID, Uid: "bench"})
			return err
		},
		"Status": func(ctx context.Context) error {
			_, err := c.Status(ctx, &kmsapi.StatusRequest{})
			return err
		},
	}
}

// BenchmarkGRPC is the bare gRPC unary round trip on a unix socket: a no-op KMS v2
// service registered through k8s.io/kms's GRPCService on the server Serve builds.
func BenchmarkGRPC(b *testing.B) {
	c := serveBench(b, "noop")
	calls := rpcs(c, make([]byte, 2+1+12+32+16), "noop")
	for _, name := range []string{"Encrypt", "Decrypt", "Status"} {
		b.Run(name, func(b *testing.B) { benchRPC(b, calls[name]) })
	}
}

// BenchmarkSocket is hwkms's Service over the same socket with a KEK that does no
// cryptography: the plugin's own per-request cost is this minus BenchmarkGRPC.
func BenchmarkSocket(b *testing.B) {
	c := serveBench(b, "service")
	enc, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	calls := rpcs(c, enc.Ciphertext, enc.KeyId)
	for _, name := range []string{"Encrypt", "Decrypt", "Status"} {
		b.Run(name, func(b *testing.B) { benchRPC(b, calls[name]) })
	}
}

// BenchmarkService is the Service methods called in process (no gRPC) with a KEK that
// does no cryptography: allocations and CPU of the request path itself.
func BenchmarkService(b *testing.B) {
	ring, err := NewKeyring(nopKEK())
	if err != nil {
		b.Fatal(err)
	}
	svc := NewService(ring, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	ctx := context.Background()
	svc.ProbeNow(ctx)
	seed := make([]byte, 32)
	enc, err := svc.Encrypt(ctx, "bench", seed)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("Encrypt", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := svc.Encrypt(ctx, "bench", seed); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Decrypt", func(b *testing.B) {
		req := &service.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := svc.Decrypt(ctx, "bench", req); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkAESGCM is in-process AES-256-GCM of a 32-byte seed with a fresh random
// nonce and a key_id-sized AAD: what a KEK held in memory would cost.
func BenchmarkAESGCM(b *testing.B) {
	key := make([]byte, 32)
	rand.Read(key)
	blk, err := aes.NewCipher(key)
	if err != nil {
		b.Fatal(err)
	}
	aead, err := cipher.NewGCM(blk)
	if err != nil {
		b.Fatal(err)
	}
	seed, aad := make([]byte, 32), frameAAD(kek.BackendTest, "0123456789abcdef0123456789abcdef0123456789a")
	nonce := make([]byte, aead.NonceSize())
	sealed := aead.Seal(nil, nonce, seed, aad)
	b.Run("Seal", func(b *testing.B) {
		out := make([]byte, 0, len(sealed))
		b.ReportAllocs()
		for b.Loop() {
			rand.Read(nonce)
			out = aead.Seal(out[:0], nonce, seed, aad)
		}
	})
	b.Run("Open", func(b *testing.B) {
		rand.Read(nonce)
		sealed = aead.Seal(nil, nonce, seed, aad)
		out := make([]byte, 0, len(seed))
		b.ReportAllocs()
		for b.Loop() {
			var err error
			if out, err = aead.Open(out[:0], nonce, sealed, aad); err != nil {
				b.Fatal(err)
			}
		}
	})
}
