// Command hwkms is a Kubernetes KMS v2 plugin whose key-encryption key never leaves a
// PKCS#11 token or a TPM 2.0. Run "hwkms help" for the commands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `hwkms: Kubernetes KMS v2 plugin with the KEK in an HSM or TPM

Usage:
  hwkms serve   --config FILE           serve KMS v2 on the configured unix socket
  hwkms dev     [--backend pkcs11|tpm] [--socket PATH] [--dir DIR]
                                        throwaway SoftHSM2 token or swtpm and KEK, served until Ctrl-C
  hwkms key create  --config FILE [--key N] [--backend pkcs11|tpm]
                                        create keys[N] (default 0) on its device, print its key_id;
                                        refuses to overwrite an existing key
  hwkms key list    --config FILE             list configured keys: key_id, backend, role, present
  hwkms key rotate  --config FILE [--apply]   create a new primary key on the primary's device; print or write the config
  hwkms key destroy --config FILE --key-id ID destroy a key that is no longer in the config (asks to confirm)
  hwkms doctor  --config FILE [--timeout D]   check module, token, PIN, keys, TPM, socket; exit 0 if safe to start
  hwkms status  --socket PATH [--timeout D]   call Status on a KMS v2 socket and print it
  hwkms bench   --socket PATH [--op encrypt|decrypt|status|mixed] [--concurrency 1,8,64]
                [--duration 5s | --ops N] [--distinct N] [--conns one|per-worker] [--pid PID] [--json]
                                        load-test any KMS v2 plugin; verifies every Decrypt
  hwkms version
  hwkms tpm ... | key import | key replicate | cluster-check    several nodes, one KEK: see "hwkms tpm"

Secrets (PINs, auth values) are read from files or environment variables named in the
config, never from the command line.
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signalContext()
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "hwkms: %v\n", err)
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(int(ee))
		}
		os.Exit(1)
	}
}

// signalContext returns a context that is done on SIGTERM or SIGINT: serve then stops
// accepting, lets in-flight requests finish (at most shutdownTimeout), removes the
// socket and closes the keys.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// exitError carries a specific exit code.
type exitError int

// exitPINRefused (78, EX_CONFIG in sysexits.h) is the exit status of serve and doctor
// when a token refused the PIN. The systemd unit lists it in RestartPreventExitStatus=:
// restarting with the same PIN file would present the refused PIN again on every
// start and could lock the token.
const exitPINRefused exitError = 78

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitError(2)
	}
	switch args[0] {
	case "serve":
		return cmdServe(ctx, args[1:], stderr)
	case "dev":
		return cmdDev(ctx, args[1:], stdout, stderr)
	case "key":
		if len(args) < 2 {
			fmt.Fprint(stderr, usage)
			return exitError(2)
		}
		switch args[1] {
		case "create":
			if handled, err := keyCreateHA(ctx, args[2:], stdout, stderr); handled {
				return err
			}
			return cmdKeyCreate(ctx, args[2:], stdout, stderr)
		case "import":
			return cmdKeyImport(ctx, args[2:], stdout, stderr)
		case "replicate":
			return cmdKeyReplicate(ctx, args[2:], stdout, stderr)
		case "list":
			return cmdKeyList(ctx, args[2:], stdout, stderr)
		case "rotate":
			return cmdKeyRotate(ctx, args[2:], stdout, stderr)
		case "destroy":
			return cmdKeyDestroy(ctx, args[2:], stdin, stdout, stderr)
		}
	case "doctor":
		return cmdDoctor(ctx, args[1:], stdout, stderr)
	case "status":
		return cmdStatus(ctx, args[1:], stdout, stderr)
	case "tpm":
		return cmdTPM(ctx, args[1:], stdout, stderr)
	case "cluster-check":
		return cmdClusterCheck(ctx, args[1:], stdout, stderr)
	case "bench":
		return cmdBench(ctx, args[1:], stdout, stderr)
	case "storage":
		return runStorage(ctx, args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "hwkms", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprintf(stderr, "unknown command %q\n\n%s", args[0], usage)
	return exitError(2)
}

// newFlags returns a FlagSet that reports errors instead of exiting.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseFlags parses args and refuses positional leftovers.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%s: unexpected arguments %q", fs.Name(), fs.Args())
	}
	return nil
}
