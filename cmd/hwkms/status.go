package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	kmsapi "k8s.io/kms/apis/v2"
)

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("status", stderr)
	socket := fs.String("socket", "", "path of the KMS v2 unix socket (required)")
	timeout := fs.Duration("timeout", 3*time.Second, "deadline of the Status call")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *socket == "" {
		return errors.New("status: --socket is required")
	}
	conn, client, err := dialKMS(*socket)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	st, err := client.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	fmt.Fprintf(stdout, "version: %s\nhealthz: %s\nkey_id: %s\n", st.Version, st.Healthz, st.KeyId)
	if st.Healthz != "ok" {
		return exitError(1)
	}
	return nil
}
