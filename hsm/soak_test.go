package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/plugin"
)

// soakFault is one fault the soak injects for a while, then clears.
type soakFault struct {
	name string
	arm  func(c *chaos)
}

var soakFaults = []soakFault{
	{"CKR_DEVICE_REMOVED", func(c *chaos) { c.down = pkcs11.CKR_DEVICE_REMOVED }},
	{"CKR_SESSION_HANDLE_INVALID", func(c *chaos) {
		c.fail["Encrypt"], c.fail["Decrypt"] = pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_HANDLE_INVALID
	}},
	{"CKR_DEVICE_ERROR", func(c *chaos) { c.down = pkcs11.CKR_DEVICE_ERROR }},
	{"slow 1.5s", func(c *chaos) { c.delay["Encrypt"], c.delay["Decrypt"] = 1500*time.Millisecond, 1500*time.Millisecond }},
	{"CKR_OBJECT_HANDLE_INVALID", func(c *chaos) {
		c.fail["EncryptInit"], c.fail["DecryptInit"] = pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_OBJECT_HANDLE_INVALID
	}},
	{"CKR_CRYPTOKI_NOT_INITIALIZED", func(c *chaos) { c.down = pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED }},
	{"hang", func(c *chaos) { c.hang["Decrypt"], c.hang["Encrypt"] = make(chan struct{}), make(chan struct{}) }},
	{"CKR_SESSION_CLOSED", func(c *chaos) {
		c.fail["EncryptInit"], c.fail["DecryptInit"] = pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_SESSION_CLOSED
	}},
}

// TestSoak runs 64 clients with mixed Encrypt/Decrypt/Status over the real socket
// (plugin.Serve + plugin.Service + hsm KEK on SoftHSM behind the chaos seam) for
// HWKMS_SOAK (default 30s), injecting a fault for 1 s every 3 s. It checks that no
// request is answered with wrong data, every failure is Unavailable or
// DeadlineExceeded, every fault is recovered from within recoveryLimit, and goroutines
// and heap are flat from start to end.
func TestSoak(t *testing.T) {
	dur := 30 * time.Second
	if s := os.Getenv("HWKMS_SOAK"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("HWKMS_SOAK=%q: %v", s, err)
		}
		dur = d
	}
	if testing.Short() {
		t.Skip("soak skipped in -short")
	}
	const (
		clients     = 64
		rpcDeadline = time.Second
		faultEvery  = 3 * time.Second
		faultFor    = time.Second
	)

	fx, toks := newTokens(t, 1)
	ch := newChaos()
	seam(t, func(p p11) p11 { ch.p11 = p; return ch })
	cfg := cfgFor(fx, toks[0], "kek")
	cfg.Sessions = 4
	createKey(t, cfg)
	k := openKEK(t, cfg)
	ring, err := plugin.NewKeyring(k)
	if err != nil {
		t.Fatal(err)
	}
	svc := plugin.NewService(ring, plugin.Options{
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		HealthInterval: time.Second,
		ProbeTimeout:   rpcDeadline,
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runDone := make(chan struct{})
	go func() { svc.Run(ctx); close(runDone) }()

	sock := filepath.Join(t.TempDir(), "kms.sock")
	ready, served := make(chan struct{}), make(chan error, 1)
	go func() {
		served <- plugin.Serve(ctx, svc, plugin.SocketOptions{Path: sock, GID: -1, Timeout: rpcDeadline}, ready)
	}()
	select {
	case <-ready:
	case err := <-served:
		t.Fatalf("Serve: %v", err)
	}
	var conns []*grpc.ClientConn
	var cls []kmsapi.KeyManagementServiceClient
	for range 8 { // 64 clients over 8 connections, as several apiservers would
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		cls = append(cls, kmsapi.NewKeyManagementServiceClient(conn))
	}

	// Known ciphertexts for Decrypt, made before any fault.
	type pair struct{ seed, ct []byte }
	var known []pair
	for range 16 {
		s := make([]byte, 32)
		rand.Read(s)
		resp, err := cls[0].Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: s, Uid: "setup"})
		if err != nil {
			t.Fatal(err)
		}
		known = append(known, pair{s, resp.Ciphertext})
	}
	keyID := k.ID()

	// Fault bookkeeping: recovery = first success of a request that started after
	// the fault cleared.
	var (
		fmu       sync.Mutex
		clearedAt time.Time
		recovered = true
		recov     = map[string]time.Duration{}
		current   string
	)
	success := func(start time.Time) {
		fmu.Lock()
		defer fmu.Unlock()
		if !recovered && start.After(clearedAt) {
			recovered = true
			d := time.Since(clearedAt)
			if d > recov[current] {
				recov[current] = d
			}
		}
	}

	var (
		codeCount [20]atomic.Int64
		wrongData atomic.Int64
		badCode   atomic.Int64
		badOnce   sync.Once
		statusBad atomic.Int64
	)
	allowed := func(err error) bool {
		c := status.Code(err)
		codeCount[c].Add(1)
		switch c {
		case codes.OK, codes.Unavailable, codes.DeadlineExceeded:
			return true
		}
		badCode.Add(1)
		badOnce.Do(func() { t.Errorf("request answered %v: %v", c, err) })
		return false
	}

	// Connect every client connection (grpc.NewClient is lazy), then take the baseline.
	for _, cl := range cls {
		if _, err := cl.Status(context.Background(), &kmsapi.StatusRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	baseHeap, baseG := ms.HeapAlloc, runtime.NumGoroutine()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() {
			cl := cls[i%len(cls)]
			r := mrand.New(mrand.NewPCG(uint64(i), 1))
			for {
				select {
				case <-stop:
					return
				default:
				}
				rctx, rcancel := context.WithTimeout(context.Background(), rpcDeadline)
				start := time.Now()
				switch op := r.IntN(10); {
				case op == 0:
					resp, err := cl.Status(rctx, &kmsapi.StatusRequest{})
					if allowed(err) && err == nil && (resp.Version != "v2" || resp.KeyId != keyID) {
						statusBad.Add(1)
					}
				case op < 5:
					p := known[r.IntN(len(known))]
					resp, err := cl.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: p.ct, KeyId: keyID, Uid: "soak"})
					if allowed(err) && err == nil {
						if !bytes.Equal(resp.Plaintext, p.seed) {
							wrongData.Add(1)
						} else {
							success(start)
						}
					}
				default:
					s := make([]byte, 32)
					rand.Read(s)
					resp, err := cl.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: s, Uid: "soak"})
					if allowed(err) && err == nil {
						d, err := cl.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: resp.Ciphertext, KeyId: resp.KeyId, Uid: "soak"})
						if allowed(err) && err == nil {
							if !bytes.Equal(d.Plaintext, s) {
								wrongData.Add(1)
							} else {
								success(start)
							}
						}
					}
				}
				rcancel()
			}
		})
	}

	// Fault schedule.
	end := time.Now().Add(dur)
	n := 0
	for time.Now().Add(faultEvery).Before(end) {
		time.Sleep(faultEvery - faultFor)
		f := soakFaults[n%len(soakFaults)]
		n++
		fmu.Lock()
		if !recovered {
			t.Errorf("fault %q: no success %v after it cleared", current, time.Since(clearedAt))
		}
		fmu.Unlock()
		ch.set(f.arm)
		time.Sleep(faultFor)
		fmu.Lock()
		ch.clear()
		current, clearedAt, recovered = f.name, time.Now(), false
		fmu.Unlock()
	}
	// Wait for the last recovery.
	for deadline := time.Now().Add(4 * recoveryLimit); ; time.Sleep(10 * time.Millisecond) {
		fmu.Lock()
		ok := recovered
		fmu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery from %q", current)
		}
	}
	time.Sleep(200 * time.Millisecond) // steady traffic again before stopping
	close(stop)
	wg.Wait()

	// Flat: goroutines back to the baseline (stuck calls have returned), heap bounded.
	var g int
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		g = runtime.NumGoroutine()
		if g <= baseG+4 || time.Now().After(deadline) {
			break
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	t.Logf("goroutines %d -> %d; heap %d KiB -> %d KiB", baseG, g, baseHeap>>10, ms.HeapAlloc>>10)
	if g > baseG+4 {
		t.Errorf("goroutines grew from %d to %d", baseG, g)
	}
	if ms.HeapAlloc > 2*baseHeap+8<<20 {
		t.Errorf("heap grew from %d KiB to %d KiB", baseHeap>>10, ms.HeapAlloc>>10)
	}

	counts := map[string]int64{}
	for c := range codeCount {
		if v := codeCount[c].Load(); v > 0 {
			counts[codes.Code(c).String()] = v
		}
	}
	t.Logf("soak %v, %d faults, responses by code: %v", dur, n, counts)
	for _, f := range soakFaults {
		if d, ok := recov[f.name]; ok {
			t.Logf("fault %-30s worst recovery %v", f.name, d.Round(time.Millisecond))
			if d > recoveryLimit {
				t.Errorf("fault %q: recovery took %v, want < %v", f.name, d, recoveryLimit)
			}
		}
	}
	if w := wrongData.Load(); w != 0 {
		t.Errorf("%d requests answered with wrong data", w)
	}
	if s := statusBad.Load(); s != 0 {
		t.Errorf("%d Status answers with a wrong version or key_id", s)
	}
	if b := badCode.Load(); b != 0 {
		t.Errorf("%d requests answered with an unexpected code", b)
	}
	if codeCount[codes.OK].Load() == 0 {
		t.Error("no request succeeded")
	}

	for _, c := range conns {
		c.Close()
	}
	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	<-runDone
}
