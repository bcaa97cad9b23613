package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hwkms/hwkms/softhsm"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// TestDev runs `hwkms dev` (what `make run` and `make run BACKEND=tpm` serve) for
// both backends: it creates its throwaway SoftHSM2 token or swtpm and key, serves a
// socket that answers Status, Encrypt and Decrypt, and on cancellation (Ctrl-C)
// removes the socket and stops every process it started.
func TestDev(t *testing.T) {
	for _, backend := range []string{"pkcs11", "tpm"} {
		t.Run(backend, func(t *testing.T) {
			// dev points SOFTHSM2_CONF of this process at its own token; restore the
			// test fixture's after it, or later tests' C_Initialize reads a removed file.
			t.Setenv(softhsm.ConfEnv, os.Getenv(softhsm.ConfEnv))
			dir := shortDir(t)
			work := filepath.Join(dir, "work")
			sock := filepath.Join(dir, "kms.sock")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var stdout, stderr lockedBuffer
			done := make(chan error, 1)
			go func() {
				done <- run(ctx, []string{"dev", "--backend", backend, "--socket", sock, "--dir", work, "--log-level", "warn"}, strings.NewReader(""), &stdout, &stderr)
			}()

			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			c := kmsapi.NewKeyManagementServiceClient(conn)
			var st *kmsapi.StatusResponse
			deadline := time.Now().Add(60 * time.Second)
			for {
				rctx, rcancel := context.WithTimeout(ctx, time.Second)
				st, err = c.Status(rctx, &kmsapi.StatusRequest{})
				rcancel()
				if err == nil && st.Healthz == "ok" {
					break
				}
				select {
				case derr := <-done:
					t.Fatalf("dev exited before serving: %v\n%s", derr, string(stderr.Bytes()))
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("dev did not serve a healthy socket in 60 s: %v %v\n%s", st, err, string(stderr.Bytes()))
				}
				time.Sleep(100 * time.Millisecond)
			}
			wantPrefix := map[string]string{"pkcs11": "p11:", "tpm": "tpm:"}[backend]
			if !strings.HasPrefix(st.KeyId, wantPrefix) {
				t.Errorf("key_id %q, want the %s backend's", st.KeyId, backend)
			}
			pt := []byte("a 32-byte DEK seed for hwkms dev")
			rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
			defer rcancel()
			enc, err := c.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "dev"})
			if err != nil {
				t.Fatal(err)
			}
			dec, err := c.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Uid: "dev"})
			if err != nil || !bytes.Equal(dec.Plaintext, pt) {
				t.Fatalf("Decrypt: %v", err)
			}
			// The README's `hwkms status --socket ./.dev/kms.sock`: a relative path works.
			t.Chdir(dir)
			var out lockedBuffer
			if err := run(ctx, []string{"status", "--socket", "./kms.sock"}, strings.NewReader(""), &out, &out); err != nil || !strings.Contains(string(out.Bytes()), "healthz: ok") {
				t.Errorf("status with a relative socket path: %v\n%s", err, out.Bytes())
			}
			if !strings.Contains(string(stdout.Bytes()), sock) {
				t.Errorf("the banner does not name the socket:\n%s", string(stdout.Bytes()))
			}
			running := childrenUsing(t, work)
			if backend == "tpm" && len(running) == 0 {
				t.Errorf("no swtpm process found with its state in %s", work)
			}

			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("dev returned %v after Ctrl-C", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("dev did not stop within 30 s of Ctrl-C")
			}
			if _, err := os.Stat(sock); err == nil {
				t.Error("socket left after dev stopped")
			}
			if left := childrenUsing(t, work); len(left) != 0 {
				t.Errorf("processes left running after dev stopped: %v", left)
			}
		})
	}
}

// childrenUsing lists the PIDs of this process's children whose command line
// mentions dir.
func childrenUsing(t *testing.T, dir string) []string {
	t.Helper()
	self := strconv.Itoa(os.Getpid())
	procs, _ := filepath.Glob("/proc/[0-9]*")
	var out []string
	for _, p := range procs {
		cmd, err := os.ReadFile(filepath.Join(p, "cmdline"))
		if err != nil || !bytes.Contains(cmd, []byte(dir)) {
			continue
		}
		stat, err := os.ReadFile(filepath.Join(p, "stat"))
		if err != nil {
			continue
		}
		// stat: pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		if f := strings.Fields(string(stat[i+1:])); len(f) > 1 && f[1] == self {
			out = append(out, filepath.Base(p))
		}
	}
	return out
}
