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
	"strings"
	"syscall"
)

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
	return dispatch(ctx, root, args, cmdIO{stdin: stdin, stdout: stdout, stderr: stderr})
}

// newFlags returns a FlagSet that reports errors instead of exiting. name is the
// command's path in the command table ("key create"); its -h prints the table's help.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	if c := lookup(strings.Fields(name)); c != nil {
		fs.Usage = func() {
			writeHelp(fs.Output(), c)
			fmt.Fprintln(fs.Output(), "\nFlags:")
			fs.PrintDefaults()
		}
	}
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
