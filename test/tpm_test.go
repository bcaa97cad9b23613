package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm/swtpm"
)

// requireSwtpm skips tb when swtpm is not installed, unless CI is set.
func requireSwtpm(tb testing.TB) {
	tb.Helper()
	if _, err := exec.LookPath(swtpm.Binary); err == nil {
		return
	}
	if os.Getenv("CI") == "" {
		tb.Skip("swtpm is not installed (apt-get install swtpm swtpm-tools)")
	}
	tb.Fatal("swtpm is required in CI")
}

// tpmBackend is a swtpm started for one test, a KEK created in it with
// `hwkms key create`, and the config that serves it.
type tpmBackend struct {
	sim     *swtpm.Sim
	cfgPath string
	socket  string
}

func newTPMBackend(t *testing.T) *tpmBackend {
	t.Helper()
	requireSwtpm(t)
	dir := t.TempDir()
	sim, err := swtpm.StartTCP(context.Background(), filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	auth := filepath.Join(dir, "kek.auth")
	if err := os.WriteFile(auth, []byte("0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := &tpmBackend{sim: sim, cfgPath: filepath.Join(dir, "hwkms.yaml"), socket: socketPath(t)}
	cfg := "socket:\n  path: " + b.socket + "\nlog:\n  level: debug\nkeys:\n  - tpm:\n" +
		"      device: " + sim.Device + "\n      blobFile: " + filepath.Join(dir, "kek.blob") + "\n      authFile: " + auth + "\n"
	if err := os.WriteFile(b.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(hwkmsBin, "key", "create", "--config", b.cfgPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "key_id: tpm:") {
		t.Fatalf("hwkms key create: %v\n%s", err, out)
	}
	return b
}

func (b *tpmBackend) serve(t *testing.T) *proc {
	t.Helper()
	return startHwkms(t, b.socket, nil, "serve", "--config", b.cfgPath)
}

// TestAPIServerTransformerTPM is TestAPIServerTransformer's contract with the TPM
// backend on swtpm: stored values carry the prefix and not the plaintext, and read back
// through a fresh transformer after a restart of kube-apiserver, of hwkms and of swtpm,
// with the same key_id each time.
func TestAPIServerTransformerTPM(t *testing.T) {
	b := newTPMBackend(t)
	p := b.serve(t)
	keyID := mustStatus(t, p.Socket).KeyId
	if !strings.HasPrefix(keyID, "tpm:") {
		t.Fatalf("key_id %q is not a TPM key_id", keyID)
	}
	cfg := writeEncryptionConfig(t, p.Socket)
	first := loadAPIServer(t, cfg)

	type stored struct {
		key        string
		plain, out []byte
	}
	var all []stored
	for i, n := range []int{16, 4 << 10, 1 << 20} {
		key := "/registry/secrets/default/t" + string(rune('a'+i))
		plain := secretPayload(t, "t", n)
		out := first.write(t, key, plain)
		obj := decodeStored(t, out)
		if strings.Contains(string(out), string(plain)) {
			t.Fatalf("%s: stored value contains the plaintext", key)
		}
		if obj.KeyID != keyID {
			t.Errorf("%s: stored key_id %q, want %q", key, obj.KeyID, keyID)
		}
		first.mustRead(t, key, out, plain)
		all = append(all, stored{key, plain, out})
	}
	readAll := func(t *testing.T) {
		t.Helper()
		fresh := loadAPIServer(t, cfg)
		for _, s := range all {
			fresh.mustRead(t, s.key, s.out, s.plain)
		}
	}

	t.Run("apiserver restart", func(t *testing.T) {
		before := decryptCalls(p)
		readAll(t)
		if decryptCalls(p) <= before {
			t.Error("the fresh transformer did not call Decrypt")
		}
	})
	outer := t // the restarted hwkms must outlive this subtest
	t.Run("plugin restart", func(t *testing.T) {
		p.stop(t)
		p = b.serve(outer)
		if got := mustStatus(t, p.Socket).KeyId; got != keyID {
			t.Fatalf("key_id after hwkms restart = %q, want %q", got, keyID)
		}
		readAll(t)
	})
	t.Run("swtpm restart", func(t *testing.T) {
		if err := b.sim.Restart(context.Background()); err != nil {
			t.Fatal(err)
		}
		// hwkms reconnects on the next request, without a restart.
		deadline := time.Now().Add(readyTimeout)
		for {
			fresh := loadAPIServer(t, cfg)
			_, _, err := fresh.read(all[0].key, all[0].out)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no read after swtpm restart: %v", err)
			}
			time.Sleep(pollEvery)
		}
		if got := mustStatus(t, p.Socket).KeyId; got != keyID {
			t.Fatalf("key_id after swtpm restart = %q, want %q", got, keyID)
		}
		readAll(t)
	})
}
