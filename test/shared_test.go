package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
	"sigs.k8s.io/yaml"
)

// TestSharedTokenThreeNodes is docs/ha.md section 3.1 with three real processes: three
// control-plane nodes whose hwkms log in to one PKCS#11 token (SoftHSM2's file-backed
// token, shared across processes as a network HSM is across hosts). They report one
// key_id, unwrap each other's seeds while all three serve at once, pass `hwkms
// cluster-check`, and rotate together (section 5): `key rotate --apply` on one node,
// the new config copied to the others, every node reloads onto the same new key and
// still unwraps the old key's seeds.
func TestSharedTokenThreeNodes(t *testing.T) {
	dev := startDev(t, "warn") // creates the token and the key; it is node 0
	env := softhsmEnv(dev.Dir)
	base, err := os.ReadFile(filepath.Join(dev.Dir, "hwkms.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	socks := []string{dev.Socket}
	var configs []string
	for i := 1; i < 3; i++ {
		sock := socketPath(t)
		cfg := withSocket(t, base, sock)
		path := filepath.Join(t.TempDir(), fmt.Sprintf("node%d.yaml", i))
		if err := os.WriteFile(path, cfg, 0o600); err != nil {
			t.Fatal(err)
		}
		startHwkms(t, sock, env, "serve", "--config", path)
		socks = append(socks, sock)
		configs = append(configs, path)
	}
	keyA := mustStatus(t, socks[0]).KeyId
	for i, s := range socks {
		if got := mustStatus(t, s).KeyId; got != keyA {
			t.Fatalf("node %d reports key_id %s, node 0 %s", i, got, keyA)
		}
	}
	oldSeeds := crossUnwrapConcurrently(t, socks)
	clusterCheck(t, socks, keyA)

	// Rotation: on node 1, then copy its config (with node 0's and node 2's socket) to the others.
	cmd := exec.Command(hwkmsBin, "key", "rotate", "--config", configs[0], "--apply")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hwkms key rotate on node 1: %v", err)
	}
	keyB := strings.TrimSpace(string(out))
	if keyB == keyA || !strings.HasPrefix(keyB, "p11:") {
		t.Fatalf("rotate printed key_id %q (old %q)", keyB, keyA)
	}
	rotated, err := os.ReadFile(configs[0])
	if err != nil {
		t.Fatal(err)
	}
	for path, sock := range map[string]string{filepath.Join(dev.Dir, "hwkms.yaml"): socks[0], configs[1]: socks[2]} {
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, withSocket(t, rotated, sock), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil { // atomically, as an operator's config management does
			t.Fatal(err)
		}
	}
	for i, s := range socks {
		waitFor(t, 30*time.Second, fmt.Sprintf("node %d to reload onto the new key", i), func() bool {
			st, err := statusOnce(s)
			return err == nil && st.KeyId == keyB && st.Healthz == "ok"
		})
	}
	// Seeds wrapped under the old key still unwrap on every node (it stays decrypt-only).
	for i, s := range socks {
		c := dial(t, s)
		for _, seed := range oldSeeds {
			dec, err := c.Decrypt(rpcCtx(t), &kmsapi.DecryptRequest{Ciphertext: seed.ct, KeyId: seed.keyID, Uid: "shared"})
			if err != nil || !bytes.Equal(dec.Plaintext, seed.pt) {
				t.Fatalf("node %d cannot unwrap a seed wrapped under the old key after the rotation: %v", i, err)
			}
		}
	}
	crossUnwrapConcurrently(t, socks)
	clusterCheck(t, socks, keyB)
}

// withSocket returns the hwkms config cfg with socket.path set to sock.
func withSocket(t *testing.T, cfg []byte, sock string) []byte {
	t.Helper()
	var m map[string]any
	if err := yaml.Unmarshal(cfg, &m); err != nil {
		t.Fatal(err)
	}
	s, _ := m["socket"].(map[string]any)
	if s == nil {
		s = map[string]any{}
	}
	s["path"] = sock
	m["socket"] = s
	out, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

type wrappedSeed struct {
	pt, ct []byte
	keyID  string
}

// crossUnwrapConcurrently has every node wrap seeds while the others unwrap them, all
// at once, and returns the seeds.
func crossUnwrapConcurrently(t *testing.T, socks []string) []wrappedSeed {
	t.Helper()
	const perNode = 40
	var (
		mu    sync.Mutex
		seeds []wrappedSeed
		wg    sync.WaitGroup
		errs  = make(chan error, len(socks)*perNode*len(socks))
	)
	clients := make([]kmsapi.KeyManagementServiceClient, len(socks))
	for i, s := range socks {
		clients[i] = dial(t, s)
	}
	for i, c := range clients {
		wg.Go(func() {
			for range perNode {
				pt := make([]byte, 32)
				if _, err := rand.Read(pt); err != nil {
					errs <- err
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "shared"})
				cancel()
				if err != nil {
					errs <- fmt.Errorf("node %d Encrypt: %w", i, err)
					return
				}
				mu.Lock()
				seeds = append(seeds, wrappedSeed{pt: pt, ct: enc.Ciphertext, keyID: enc.KeyId})
				mu.Unlock()
				for j, oc := range clients {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					dec, err := oc.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "shared"})
					cancel()
					if err != nil || !bytes.Equal(dec.Plaintext, pt) {
						errs <- fmt.Errorf("node %d cannot unwrap node %d's seed: %v", j, i, err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	return seeds
}

// clusterCheck runs `hwkms cluster-check` on socks and wants it to pass with keyID.
func clusterCheck(t *testing.T, socks []string, keyID string) {
	t.Helper()
	out, err := exec.Command(hwkmsBin, "cluster-check", "--sockets", strings.Join(socks, ",")).CombinedOutput()
	want := fmt.Sprintf("cluster-check: ok, %d nodes, key_id %s", len(socks), keyID)
	if err != nil || !strings.Contains(string(out), want) {
		t.Fatalf("cluster-check: %v\n%s\nwant %q", err, out, want)
	}
}
