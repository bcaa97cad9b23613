package tpm

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/hwkms/hwkms/tpm/swtpm"
)

const testHandle = "0x81010010"

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// keyForm is one of the two ways to keep a KEK.
type keyForm struct {
	name string
	cfg  func(t testing.TB, sim *swtpm.Sim) Config
}

var keyForms = []keyForm{
	{"persistent", func(t testing.TB, sim *swtpm.Sim) Config {
		return Config{Device: sim.Device, PersistentHandle: testHandle}
	}},
	{"blob", func(t testing.TB, sim *swtpm.Sim) Config {
		return Config{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek.blob")}
	}},
}

// createKey creates the KEK in cfg and fails the test on error.
func createKey(t testing.TB, cfg Config) KeyInfo {
	t.Helper()
	info, err := CreateKey(testCtx(t), cfg)
	if err != nil {
		t.Fatalf("CreateKey: %v", err)
	}
	return info
}

// openKEK opens cfg on sim, and at cleanup closes it and checks that the TPM holds
// no transient object or session any more.
func openKEK(t testing.TB, sim *swtpm.Sim, cfg Config) *KEK {
	t.Helper()
	k, err := Open(testCtx(t), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if sim.PID() != 0 {
			assertNoHandles(t, sim)
		}
	})
	return k
}

// handleSet is what a TPM holds: transient objects and sessions (loaded or saved).
type handleSet struct {
	Transient []tpm2.TPMHandle
	Sessions  []tpm2.TPMHandle
}

func listAll(c *conn) (handleSet, error) {
	var hs handleSet
	var err error
	if hs.Transient, err = listHandles(c, tpm2.TPMHTTransient); err != nil {
		return hs, err
	}
	for _, ht := range []tpm2.TPMHT{tpm2.TPMHTHMACSession, tpm2.TPMHTPolicySession} {
		s, err := listHandles(c, ht)
		if err != nil {
			return hs, err
		}
		hs.Sessions = append(hs.Sessions, s...)
	}
	slices.Sort(hs.Transient)
	slices.Sort(hs.Sessions)
	return hs, nil
}

// simHandles lists the TPM's handles on a new connection (swtpm serves one
// connection at a time: no KEK may be connected).
func simHandles(t testing.TB, sim *swtpm.Sim) handleSet {
	t.Helper()
	dev, err := parseDevice(sim.Device)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := dial(ctx, dev)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.ctx = ctx
	hs, err := listAll(c)
	if err != nil {
		t.Fatalf("list handles: %v", err)
	}
	return hs
}

func assertNoHandles(t testing.TB, sim *swtpm.Sim) {
	t.Helper()
	if hs := simHandles(t, sim); len(hs.Transient) != 0 || len(hs.Sessions) != 0 {
		t.Errorf("after Close the TPM still holds %+v", hs)
	}
}

// kekHandles lists the TPM's handles over the KEK's own connection.
func kekHandles(t testing.TB, k *KEK) handleSet {
	t.Helper()
	var hs handleSet
	err := k.do(testCtx(t), "list", func() error {
		var err error
		hs, err = listAll(k.c)
		return err
	})
	if err != nil {
		t.Fatalf("list handles: %v", err)
	}
	return hs
}

// assertOnlyOwn checks that the TPM holds exactly what the open KEK legitimately
// holds: its transient KEK (blob form) and its sessions.
func assertOnlyOwn(t testing.TB, k *KEK) {
	t.Helper()
	got := kekHandles(t, k)
	var want handleSet
	k.sem <- struct{}{}
	if k.kekTransient {
		want.Transient = append(want.Transient, k.kek)
	}
	for _, s := range []tpm2.Session{k.sIn, k.sOut, k.sPol} {
		if s != nil {
			want.Sessions = append(want.Sessions, s.Handle())
		}
	}
	<-k.sem
	slices.Sort(want.Transient)
	slices.Sort(want.Sessions)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("TPM holds %+v, the KEK accounts for %+v", got, want)
	}
}

// extendPCR extends a SHA-256 PCR over the KEK's connection.
func extendPCR(t testing.TB, k *KEK, pcr int) {
	t.Helper()
	err := k.do(testCtx(t), "extend", func() error {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
				HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32),
			}}},
		}.Execute(k.c)
		return err
	})
	if err != nil {
		t.Fatalf("PCR_Extend(%d): %v", pcr, err)
	}
}

func writeFile(t testing.TB, data string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// serveProxy accepts connections on ln until it is closed and joins each to a new
// connection to the unix socket target through pump, counting its goroutines in wg
// (the caller added one for serveProxy itself).
func serveProxy(ln net.Listener, wg *sync.WaitGroup, target string, pump func(c, up net.Conn)) {
	defer wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			up, err := net.Dial("unix", target)
			if err != nil {
				return
			}
			defer up.Close()
			pump(c, up)
		}()
	}
}
