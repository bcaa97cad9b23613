package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdServer is a single-member etcd on loopback.
type etcdServer struct {
	proc   *proc
	URL    string // client URL, http://127.0.0.1:port
	Client *clientv3.Client
}

// startEtcd starts etcd with its data in dir and waits until it answers a read. It is
// stopped by PID in t.Cleanup.
func startEtcd(t testing.TB, dir string) *etcdServer {
	t.Helper()
	bin := binaryPath(t, "E2E_ETCD")
	var lastErr error
	for attempt := range 3 { // a picked port can be taken before etcd binds it
		client := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
		peer := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
		p := startProc(t, "etcd", filepath.Join(dir, "etcd.log"), bin, []string{
			"--name", "e2e",
			"--data-dir", filepath.Join(dir, "etcd-data"),
			"--listen-client-urls", client,
			"--advertise-client-urls", client,
			"--listen-peer-urls", peer,
			"--initial-advertise-peer-urls", peer,
			"--initial-cluster", "e2e=" + peer,
			"--listen-metrics-urls", "",
			"--log-level", "warn",
			"--unsafe-no-fsync", // a throwaway test store; fsync only costs time here
		}, nil)
		t.Cleanup(func() { p.stop(syscall.SIGTERM, 10*time.Second) })
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:   []string{client},
			DialTimeout: 5 * time.Second,
			Logger:      zap.NewNop(),
		})
		if err != nil {
			t.Fatalf("etcd client: %v", err)
		}
		t.Cleanup(func() { cli.Close() })
		err = waitFor(context.Background(), 30*time.Second, 100*time.Millisecond, p, func(ctx context.Context) error {
			_, err := cli.Get(ctx, "/e2e-ready-probe")
			return err
		})
		if err == nil {
			t.Logf("etcd ready at %s (pid %d)", client, p.pid())
			return &etcdServer{proc: p, URL: client, Client: cli}
		}
		lastErr = fmt.Errorf("attempt %d: %w\n%s", attempt+1, err, p.logTail(20))
		p.stop(syscall.SIGKILL, time.Second)
	}
	t.Fatalf("etcd did not become ready: %v", lastErr)
	return nil
}

// raw returns the value stored under key, failing the test if it is missing.
func (e *etcdServer) raw(t testing.TB, key string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := e.Client.Get(ctx, key)
	if err != nil {
		t.Fatalf("etcd get %s: %v", key, err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("etcd get %s: %d values, want 1", key, len(resp.Kvs))
	}
	return resp.Kvs[0].Value
}

// modRevision returns the etcd mod revision of key.
func (e *etcdServer) modRevision(t testing.TB, key string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := e.Client.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("etcd get %s: %v (%d values)", key, err, len(resp.Kvs))
	}
	return resp.Kvs[0].ModRevision
}

// put overwrites key with value.
func (e *etcdServer) put(t testing.TB, key string, value []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.Client.Put(ctx, key, string(value)); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

// secretKey is where kube-apiserver stores a Secret (default --etcd-prefix /registry).
func secretKey(namespace, name string) string {
	return "/registry/secrets/" + namespace + "/" + name
}
