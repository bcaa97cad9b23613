package main

// cluster-check (docs/ha.md): every node serves the same key_id, is healthy, and
// decrypts what every other node encrypts.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
)

// cmdClusterCheck calls Status on every socket, then Encrypts a random seed on each
// and Decrypts it on every socket, and prints the matrix.
func cmdClusterCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("cluster-check", stderr)
	sockets := fs.String("sockets", "", "comma-separated KMS v2 unix socket paths, one per node")
	timeout := fs.Duration("timeout", 5*time.Second, "deadline of each RPC")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *sockets == "" {
		return errors.New("cluster-check: --sockets is required")
	}
	paths := strings.Split(*sockets, ",")
	clients := make([]kmsapi.KeyManagementServiceClient, len(paths))
	for i, p := range paths {
		conn, client, err := dialKMS(p)
		if err != nil {
			return fmt.Errorf("cluster-check: %s: %w", p, err)
		}
		defer conn.Close()
		clients[i] = client
	}
	call := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, *timeout) }
	failed := false
	ids := make([]string, len(paths))
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSOCKET\tHEALTHZ\tKEY_ID")
	for i, c := range clients {
		cctx, cancel := call()
		st, err := c.Status(cctx, &kmsapi.StatusRequest{})
		cancel()
		h := "-"
		switch {
		case err != nil:
			h, failed = "ERROR: "+err.Error(), true
		case st.Version != "v2" || st.Healthz != "ok":
			h, failed = fmt.Sprintf("%s (version %q)", st.Healthz, st.Version), true
			ids[i] = st.KeyId
		default:
			h, ids[i] = st.Healthz, st.KeyId
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", i, paths[i], h, ids[i])
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for i := range ids {
		if ids[i] != ids[0] {
			fmt.Fprintf(stdout, "MISMATCH: node %d reports key_id %q, node 0 %q\n", i, ids[i], ids[0])
			failed = true
		}
	}
	fmt.Fprintln(stdout, "\nencrypt on row, decrypt on column:")
	fmt.Fprint(tw, "ENC\\DEC")
	for j := range clients {
		fmt.Fprintf(tw, "\t%d", j)
	}
	fmt.Fprintln(tw)
	for i, enc := range clients {
		fmt.Fprintf(tw, "%d", i)
		seed := make([]byte, 32)
		if _, err := rand.Read(seed); err != nil {
			return err
		}
		uid := fmt.Sprintf("hwkms-cluster-check-%d", i)
		cctx, cancel := call()
		er, err := enc.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: seed, Uid: uid})
		cancel()
		if err == nil && er.KeyId != ids[i] {
			err = fmt.Errorf("Encrypt key_id %q differs from Status %q", er.KeyId, ids[i])
		}
		if err != nil {
			failed = true
			for range clients {
				fmt.Fprint(tw, "\tENC-FAIL")
			}
			fmt.Fprintf(tw, "\t(%v)\n", err)
			continue
		}
		for _, dec := range clients {
			cctx, cancel := call()
			dr, err := dec.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: er.Ciphertext, Uid: uid, KeyId: er.KeyId, Annotations: er.Annotations})
			cancel()
			switch {
			case err != nil:
				failed = true
				fmt.Fprint(tw, "\tFAIL")
			case !bytes.Equal(dr.Plaintext, seed):
				failed = true
				fmt.Fprint(tw, "\tWRONG")
			default:
				fmt.Fprint(tw, "\tok")
			}
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if failed {
		fmt.Fprintln(stdout, "cluster-check: FAILED")
		return exitError(1)
	}
	fmt.Fprintf(stdout, "cluster-check: ok, %d nodes, key_id %s\n", len(clients), ids[0])
	return nil
}
