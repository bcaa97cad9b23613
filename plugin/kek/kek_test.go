package kek

import "testing"

// TestAPIServerKeyIDHash: the label is "sha256:" and the hex SHA-256 of the key_id,
// as kube-apiserver's envelope metrics write it, and empty for an empty key_id.
func TestAPIServerKeyIDHash(t *testing.T) {
	for id, want := range map[string]string{
		"":    "",
		"abc": "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
	} {
		if got := APIServerKeyIDHash(id); got != want {
			t.Errorf("APIServerKeyIDHash(%q) = %q, want %q", id, got, want)
		}
	}
}
