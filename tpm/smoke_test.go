package tpm

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/hwkms/hwkms/tpm/swtpm/swtpmtest"
)

func TestSmoke(t *testing.T) {
	sim := swtpmtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, cfg := range []Config{
		{Device: sim.Device, PersistentHandle: "0x81010010"},
		{Device: sim.Device, BlobFile: filepath.Join(t.TempDir(), "kek")},
	} {
		info, err := CreateKey(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%+v", info)
		k, err := Open(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		body, err := k.Wrap(ctx, []byte("hello"), []byte("aad"))
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("body %d bytes", len(body))
		pt, err := k.Unwrap(ctx, body, []byte("aad"))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pt, []byte("hello")) {
			t.Fatal("mismatch")
		}
		_, err = k.Unwrap(ctx, body, []byte("aae"))
		t.Log(err)
		if err := k.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
