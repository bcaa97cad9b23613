package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"
)

// writeKubeconfig writes a kubeconfig for kubectl: server URL, the pinned serving
// certificate and the system:masters bearer token.
func writeKubeconfig(t testing.TB, path, server, token string, caPEM []byte) {
	t.Helper()
	cfg := map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"current-context": "e2e",
		"clusters": []any{map[string]any{"name": "e2e", "cluster": map[string]any{
			"server":                     server,
			"certificate-authority-data": base64.StdEncoding.EncodeToString(caPEM),
		}}},
		"users": []any{map[string]any{"name": "e2e-admin", "user": map[string]any{"token": token}}},
		"contexts": []any{map[string]any{"name": "e2e", "context": map[string]any{
			"cluster": "e2e", "user": "e2e-admin",
		}}},
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// kubectl runs the kubectl binary (E2E_KUBECTL) against this kube-apiserver with
// stdin, and returns its stdout; a failure fails the test with kubectl's stderr.
func (a *apiServer) kubectl(stdin []byte, args ...string) []byte {
	t := a.t
	t.Helper()
	bin := binaryPath(t, "E2E_KUBECTL")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"--kubeconfig", a.Kubeconfig}, args...)...)
	// Only what kubectl needs: no KUBECONFIG or cache from the machine running the suite.
	cmd.Env = []string{"HOME=" + a.dir, "PATH=" + os.Getenv("PATH")}
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, lastLines(stderr.String(), 10))
	}
	return stdout.Bytes()
}
