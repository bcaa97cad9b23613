package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

func TestMain(m *testing.M) { softhsmtest.Main(m) }

// shortDir returns a temp dir short enough for a unix socket path.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "hk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startServe runs serve() for the config at path until the test ends and returns a client.
func startServe(t *testing.T, path string) kmsapi.KeyManagementServiceClient {
	t.Helper()
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	errc := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	go func() { errc <- serve(ctx, cfg, path, log, ready) }()
	select {
	case <-ready:
	case err := <-errc:
		t.Fatalf("serve: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+cfg.Socket.Path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("serve returned %v", err)
		}
		if _, err := os.Stat(cfg.Socket.Path); err == nil {
			t.Errorf("socket %s left after shutdown", cfg.Socket.Path)
		}
	})
	return kmsapi.NewKeyManagementServiceClient(conn)
}

func runCLI(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), args, strings.NewReader(stdin), &out, &errb)
	if err != nil {
		t.Logf("hwkms %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), err
}

func waitKeyID(t *testing.T, c kmsapi.KeyManagementServiceClient, want string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := c.Status(context.Background(), &kmsapi.StatusRequest{})
		if err == nil && st.KeyId == want && st.Healthz == "ok" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Status never reported key_id %s (last %+v, %v)", want, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type sealed struct {
	ct, pt []byte
	keyID  string
}

// TestRotationUnderLoad: 16 clients loop Encrypt+Decrypt while the primary is rotated
// twice with `hwkms key rotate --apply` (picked up by the config file watch). No request
// may fail, every generation's ciphertexts still decrypt, Status follows the primary.
// Then the old keys are retired as docs/rotation.md says and destroyed.
func TestRotationUnderLoad(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	keyA := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek-a"}
	infoA, err := hsm.CreateKey(context.Background(), keyA)
	if err != nil {
		t.Fatal(err)
	}
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}, Keys: []config.Key{{PKCS11: &keyA}}})
	client := startServe(t, path)
	waitKeyID(t, client, infoA.KeyID)

	ctx, stop := context.WithCancel(context.Background())
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		all      []sealed
		failures atomic.Int64
		ops      atomic.Int64
		firstErr atomic.Value
	)
	fail := func(err error) {
		failures.Add(1)
		firstErr.CompareAndSwap(nil, err)
	}
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				pt := make([]byte, 32)
				rand.Read(pt)
				rctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				enc, err := client.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: fmt.Sprint(w)})
				if err != nil {
					cancel()
					fail(fmt.Errorf("encrypt: %w", err))
					continue
				}
				dec, err := client.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: fmt.Sprint(w)})
				cancel()
				if err != nil {
					fail(fmt.Errorf("decrypt: %w", err))
					continue
				}
				if !bytes.Equal(dec.Plaintext, pt) {
					fail(fmt.Errorf("decrypt returned wrong plaintext"))
					continue
				}
				ops.Add(1)
				mu.Lock()
				all = append(all, sealed{enc.Ciphertext, pt, enc.KeyId})
				mu.Unlock()
			}
		}()
	}

	ids := []string{infoA.KeyID}
	for range 2 {
		time.Sleep(300 * time.Millisecond) // let load build up under the current primary
		out, err := runCLI(t, "", "key", "rotate", "--config", path, "--apply")
		if err != nil {
			t.Fatal(err)
		}
		id := strings.TrimSpace(out)
		ids = append(ids, id)
		waitKeyID(t, client, id)
	}
	time.Sleep(300 * time.Millisecond)
	stop()
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d requests failed during rotation; first: %v", n, firstErr.Load())
	}
	t.Logf("%d encrypt+decrypt pairs across key_ids %v", ops.Load(), ids)

	gens := map[string]int{}
	for _, s := range all {
		gens[s.keyID]++
	}
	for _, id := range ids {
		if gens[id] == 0 {
			t.Fatalf("no ciphertext was made under key_id %s (generations %v)", id, gens)
		}
	}
	decryptAll(t, client, all)

	// Retire A as docs/rotation.md says: it cannot be destroyed while in the config.
	if _, err := runCLI(t, "", "key", "destroy", "--config", path, "--key-id", infoA.KeyID, "--confirm", infoA.KeyID); err == nil {
		t.Fatal("key destroy succeeded while the key is in the config")
	}
	cfg, _ := config.Load(path)
	cfg.Keys = cfg.Keys[:len(cfg.Keys)-1] // A is last: the oldest
	writeYAML(t, path, cfg)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := client.Decrypt(context.Background(), &kmsapi.DecryptRequest{Ciphertext: all[0].ct, KeyId: infoA.KeyID})
		if err != nil && strings.Contains(err.Error(), infoA.KeyID) && strings.Contains(err.Error(), "NotFound") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after removing key A, Decrypt under it gives %v, want NotFound naming %s", err, infoA.KeyID)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := runCLI(t, "wrong\n", "key", "destroy", "--config", path, "--key-id", infoA.KeyID); err == nil {
		t.Fatal("key destroy went ahead without confirmation")
	}
	if _, err := runCLI(t, infoA.KeyID+"\n", "key", "destroy", "--config", path, "--key-id", infoA.KeyID); err != nil {
		t.Fatal(err)
	}
	keys, err := hsm.ListKeys(context.Background(), keyA)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.KeyID == infoA.KeyID {
			t.Fatal("key A still on the token after destroy")
		}
	}
	var rest []sealed
	for _, s := range all {
		if s.keyID != infoA.KeyID {
			rest = append(rest, s)
		}
	}
	decryptAll(t, client, rest)
}

func decryptAll(t *testing.T, c kmsapi.KeyManagementServiceClient, all []sealed) {
	t.Helper()
	for i, s := range all {
		dec, err := c.Decrypt(context.Background(), &kmsapi.DecryptRequest{Ciphertext: s.ct, KeyId: s.keyID})
		if err != nil || !bytes.Equal(dec.Plaintext, s.pt) {
			t.Fatalf("ciphertext %d under %s no longer decrypts: %v", i, s.keyID, err)
		}
	}
}

func writeYAML(t *testing.T, path string, cfg *config.Config) {
	t.Helper()
	data, err := yamlMarshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFileAtomic(path, data); err != nil {
		t.Fatal(err)
	}
}

// TestDestroyFailsClosed: key destroy refuses when it cannot rule out that a
// configured key is the one to destroy: a label several keys share (no keyCKAID), or
// a configured key whose token it cannot read (wrong PIN). Nothing is destroyed.
func TestDestroyFailsClosed(t *testing.T) {
	ctx := context.Background()
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	primary := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "primary"}
	if _, err := hsm.CreateKey(ctx, primary); err != nil {
		t.Fatal(err)
	}
	dup := primary
	dup.KeyLabel = "dup"
	info, err := hsm.CreateKey(ctx, dup)
	if err != nil {
		t.Fatal(err)
	}
	target := info.KeyID
	// hsm.CreateKey refuses a second key with a label; another tool would not.
	createExtractableKey(t, fx.Module, tok, "dup")
	path := filepath.Join(dir, "hwkms.yaml")
	base := config.Config{Socket: config.Socket{Path: filepath.Join(dir, "kms.sock")}}
	destroy := func(keys ...config.Key) error {
		t.Helper()
		c := base
		c.Keys = keys
		writeYAML(t, path, &c)
		_, err := runCLI(t, "", "key", "destroy", "--config", path, "--key-id", target, "--confirm", target)
		return err
	}

	if err := destroy(config.Key{PKCS11: &primary}, config.Key{PKCS11: &dup}); err == nil || !strings.Contains(err.Error(), "keys[1]") {
		t.Errorf("destroy of one of two keys a configured label matches = %v, want a refusal naming keys[1]", err)
	}
	wrong := dup
	wrong.PINFile = filepath.Join(dir, "wrong.pin")
	if err := os.WriteFile(wrong.PINFile, []byte("not-the-pin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := destroy(config.Key{PKCS11: &primary}, config.Key{PKCS11: &wrong}); err == nil || !strings.Contains(err.Error(), "cannot tell whether keys[1]") {
		t.Errorf("destroy with an unreadable configured key = %v, want a fail-closed refusal", err)
	}
	keys, err := hsm.ListKeys(ctx, primary)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, k := range keys {
		if k.Label == "dup" {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d keys labelled dup left, want 2: a refused destroy destroyed something", n)
	}
	// With the label pinned to the other key by CKA_ID, the destroy goes ahead.
	pinned := dup
	for _, k := range keys {
		if k.Label == "dup" && k.KeyID != target {
			pinned.KeyCKAID = k.CKAID
		}
	}
	if err := destroy(config.Key{PKCS11: &primary}, config.Key{PKCS11: &pinned}); err != nil {
		t.Fatalf("destroy of an unconfigured key: %v", err)
	}
}
