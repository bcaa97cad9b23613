package tpm

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/hwkms/hwkms/plugin/kek"
)

// Reason returns a short, bounded name for err, for metric labels and logs: the
// TPM_RC name of the TPM's response code (for a format-1 code, the canonical name
// without handle, parameter or session index, such as "TPM_RC_INTEGRITY"),
// "unavailable" for a transport failure or lost connection with no response code,
// "policy" for ErrPolicy without a response code, or "other". Every result is a
// name from go-tpm's fixed tables or one of those words, never free text.
func Reason(err error) string {
	if err == nil {
		return "other"
	}
	var rc tpm2.TPMRC
	if errors.As(err, &rc) {
		var fmt1 tpm2.TPMFmt1Error
		s := rc.Error()
		if errors.As(rc, &fmt1) {
			s = fmt1.Error()
		}
		// go-tpm formats "TPM_RC_NAME: description" or "TPM_RC_NAME (parameter 1): ...".
		if i := strings.IndexAny(s, " :"); i > 0 && validRCName(s[:i]) {
			return s[:i]
		}
		return "other"
	}
	switch {
	case errors.Is(err, ErrPolicy):
		return "policy"
	case errors.Is(err, errTransport), errors.Is(err, errDesync), errors.Is(err, kek.ErrUnavailable):
		return "unavailable"
	}
	return "other"
}

func validRCName(s string) bool {
	if !strings.HasPrefix(s, "TPM_RC_") {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool {
		return !(r == '_' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	}) < 0
}

// Reconnects returns how many times the KEK has re-established its connection to the
// TPM after losing it (transport failure, TPM restart), since Open. Safe for
// concurrent use; it never touches the TPM.
func (k *KEK) Reconnects() uint64 { return k.reconnects.Load() }

// CheckDevice connects to the TPM that cfg names and runs TPM2_Startup if the TPM
// needs it, then disconnects. It does not flush or create anything. An unreachable
// TPM gives an error wrapping kek.ErrUnavailable. On a TPM without a resource
// manager that another process is using (swtpm), it waits for that connection up to
// ctx's deadline.
func CheckDevice(ctx context.Context, cfg Config) error {
	dev, err := parseDevice(cfg.Device)
	if err != nil {
		return fmt.Errorf("tpm: device: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return err
	}
	return c.Close()
}

// CheckPCRs reads the SHA-256 PCRs listed in cfg.PCRs with TPM2_PCR_Read (Part 3
// section 22.4) and checks that the TPM returned every one of them, which a PCR
// policy needs. With no PCRs configured it does nothing.
func CheckPCRs(ctx context.Context, cfg Config) error {
	pcrs, err := pcrList(cfg.PCRs)
	if err != nil {
		return fmt.Errorf("tpm: pcrs: %w", err)
	}
	if len(pcrs) == 0 {
		return nil
	}
	dev, err := parseDevice(cfg.Device)
	if err != nil {
		return fmt.Errorf("tpm: device: %w", err)
	}
	c, err := openAdmin(ctx, dev)
	if err != nil {
		return err
	}
	defer c.Close()
	k := &KEK{pcrs: pcrs}
	sel := k.pcrSelection()
	rsp, err := tpm2.PCRRead{PCRSelectionIn: sel}.Execute(c)
	if err != nil {
		return fmt.Errorf("tpm: TPM2_PCR_Read: %w", err)
	}
	if len(rsp.PCRValues.Digests) != len(pcrs) {
		return fmt.Errorf("tpm: TPM2_PCR_Read returned %d of %d selected SHA-256 PCRs (is the SHA-256 bank allocated?)", len(rsp.PCRValues.Digests), len(pcrs))
	}
	return nil
}
