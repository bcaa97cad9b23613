package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMain runs the suite and then fails it if any child process it started (etcd,
// kube-apiserver, hwkms, swtpm, softhsm2-util) is still alive: every test must stop
// what it starts.
func TestMain(m *testing.M) {
	code := m.Run()
	if left := childProcesses(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "e2e: child processes still running after the suite: %s\n", strings.Join(left, "; "))
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// childProcesses lists this process's live children as "pid cmdline", from
// /proc/self/task/*/children.
func childProcesses() []string {
	files, _ := filepath.Glob("/proc/self/task/*/children")
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, pid := range strings.Fields(string(b)) {
			cmd, _ := os.ReadFile("/proc/" + pid + "/cmdline")
			out = append(out, pid+" "+strings.ReplaceAll(strings.TrimRight(string(cmd), "\x00"), "\x00", " "))
		}
	}
	return out
}
