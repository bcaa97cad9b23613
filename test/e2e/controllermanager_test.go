package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// controllerManagerControllers are the only controllers the suite's
// kube-controller-manager runs: storage-version-migrator-controller runs
// StorageVersionMigrations (storagemigration.k8s.io/v1, GA and served by default in
// Kubernetes 1.37), and refuses to start without the garbage collector, whose
// dependency graph it lists every object of a resource from
// (cmd/kube-controller-manager/app/storageversionmigrator.go in k8s.io/kubernetes
// v1.37.2). Its feature gates (StorageVersionMigrator; client-go's
// InformerResourceVersion, InOrderInformers) are on by default in 1.37.
const controllerManagerControllers = "garbage-collector-controller,storage-version-migrator-controller"

// controllerManager is a kube-controller-manager on loopback, talking to one
// apiServer with the suite's system:masters kubeconfig.
type controllerManager struct {
	proc *proc
	URL  string // secure port, for /healthz
}

// startControllerManager starts kube-controller-manager (E2E_KUBE_CONTROLLER_MANAGER)
// against a with only controllerManagerControllers, no leader election, serving
// /healthz on a free loopback port (an in-memory self-signed certificate; /healthz is
// always allowed), and waits until /healthz answers ok. It is stopped by PID in
// t.Cleanup, before the kube-apiserver it talks to.
func startControllerManager(t testing.TB, a *apiServer) *controllerManager {
	t.Helper()
	bin := binaryPath(t, "E2E_KUBE_CONTROLLER_MANAGER")
	began := time.Now()
	// The serving certificate is generated in memory at each start: nothing to pin.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	logPath := filepath.Join(a.dir, "kube-controller-manager.log")
	for attempt := 1; ; attempt++ { // a picked port can be taken before it binds it
		port := strconv.Itoa(freePort(t))
		m := &controllerManager{URL: "https://127.0.0.1:" + port}
		m.proc = startProc(t, "kube-controller-manager", logPath, bin, []string{
			"--kubeconfig", a.Kubeconfig,
			"--controllers", controllerManagerControllers,
			"--leader-elect=false",
			"--bind-address", "127.0.0.1",
			"--secure-port", port,
			"--v", "2",
		}, nil)
		t.Cleanup(func() { m.proc.stop(syscall.SIGTERM, 30*time.Second) })
		err := waitFor(context.Background(), 90*time.Second, 250*time.Millisecond, m.proc, func(ctx context.Context) error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.URL+"/healthz", nil)
			if err != nil {
				return err
			}
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("/healthz: %d %s", resp.StatusCode, lastLines(string(body), 6))
			}
			return nil
		})
		if done, _ := m.proc.exited(); err != nil && done && attempt < 3 && strings.Contains(m.proc.logTail(30), "address already in use") {
			t.Logf("kube-controller-manager could not bind port %s; trying another", port)
			continue
		}
		if err != nil {
			t.Fatalf("kube-controller-manager did not become healthy: %v\n%s", err, m.proc.logTail(30))
		}
		t.Logf("kube-controller-manager (%s) healthy in %s (pid %d)", controllerManagerControllers, time.Since(began).Round(10*time.Millisecond), m.proc.pid())
		return m
	}
}
