package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/hsm"
	"github.com/hwkms/hwkms/plugin/config"
	"github.com/hwkms/hwkms/softhsm/softhsmtest"
)

// TestBenchAgainstServer runs `hwkms bench` against a real server on SoftHSM for each
// op and checks that it counts, verifies and reports.
func TestBenchAgainstServer(t *testing.T) {
	fx := softhsmtest.New(t)
	tok := softhsmtest.NewToken(t, fx)
	dir := shortDir(t)
	path := filepath.Join(dir, "hwkms.yaml")
	key := hsm.Config{Module: fx.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, KeyLabel: "kek"}
	if _, err := hsm.CreateKey(context.Background(), key); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "kms.sock")
	writeYAML(t, path, &config.Config{Socket: config.Socket{Path: sock}, Keys: []config.Key{{PKCS11: &key}}})
	startServe(t, path)

	for _, op := range []string{"encrypt", "decrypt", "status", "mixed"} {
		t.Run(op, func(t *testing.T) {
			out, err := runCLI(t, "", "bench", "--socket", sock, "--op", op, "--concurrency", "1,4", "--ops", "200", "--distinct", "50", "--conns", "per-worker", "--json")
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 2 {
				t.Fatalf("want 2 result lines, got %q", out)
			}
			for i, l := range lines {
				var r benchResult
				if err := json.Unmarshal([]byte(l), &r); err != nil {
					t.Fatal(err)
				}
				if r.Count != 200 || r.Errors != 0 || r.Concurrency != []int{1, 4}[i] || r.P50us <= 0 || r.P99us < r.P50us || r.MaxUs < r.P99us {
					t.Fatalf("bad result %+v", r)
				}
			}
		})
	}
	// A socket nobody serves: every request fails and bench says so.
	if _, err := runCLI(t, "", "bench", "--socket", filepath.Join(dir, "none.sock"), "--op", "status", "--concurrency", "1", "--ops", "3", "--timeout", "200ms"); err == nil {
		t.Fatal("bench against a dead socket reported success")
	}
}

// toyPlugin is another KMS v2 plugin, not hwkms: its Decrypt needs the annotation its
// Encrypt returned, as the KMS v2 contract allows; lie makes Decrypt return a wrong
// plaintext.
type toyPlugin struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	lie bool
}

func (p *toyPlugin) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "toy"}, nil
}

func (p *toyPlugin) Encrypt(_ context.Context, r *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	pad := make([]byte, len(r.Plaintext))
	rand.Read(pad)
	ct := make([]byte, len(pad))
	for i := range pad {
		ct[i] = r.Plaintext[i] ^ pad[i]
	}
	return &kmsapi.EncryptResponse{Ciphertext: ct, KeyId: "toy", Annotations: map[string][]byte{"pad.toy.example.com": pad}}, nil
}

func (p *toyPlugin) Decrypt(_ context.Context, r *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	pad := r.Annotations["pad.toy.example.com"]
	if len(pad) != len(r.Ciphertext) {
		return nil, status.Error(codes.InvalidArgument, "annotation missing")
	}
	pt := make([]byte, len(pad))
	for i := range pad {
		pt[i] = r.Ciphertext[i] ^ pad[i]
	}
	if p.lie {
		pt[0] ^= 1
	}
	return &kmsapi.DecryptResponse{Plaintext: pt}, nil
}

// TestBenchAgainstAnotherPlugin: bench works against a plugin that needs its
// annotations back, and counts a Decrypt that returns the wrong plaintext as an error.
func TestBenchAgainstAnotherPlugin(t *testing.T) {
	for _, lie := range []bool{false, true} {
		sock := filepath.Join(shortDir(t), "toy.sock")
		ln, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		srv := grpc.NewServer()
		kmsapi.RegisterKeyManagementServiceServer(srv, &toyPlugin{lie: lie})
		go srv.Serve(ln)
		out, err := runCLI(t, "", "bench", "--socket", sock, "--op", "decrypt", "--concurrency", "2", "--ops", "100", "--distinct", "10", "--json")
		srv.Stop()
		var r benchResult
		if jerr := json.Unmarshal([]byte(strings.TrimSpace(out)), &r); jerr != nil {
			t.Fatalf("lie=%v: output %q: %v", lie, out, jerr)
		}
		switch {
		case !lie && (err != nil || r.Errors != 0 || r.Count != 100):
			t.Errorf("against an honest plugin that needs its annotations: %+v, %v", r, err)
		case lie && (err == nil || r.Errors != 100 || !strings.Contains(r.FirstError, "different plaintext")):
			t.Errorf("against a plugin returning wrong plaintexts: %+v, %v; want 100 errors", r, err)
		}
	}
}
