package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// command is one entry of the command table: a command with a run function, or a
// group (key, tpm) of subcommands. The table generates the top-level usage, "hwkms
// help COMMAND" and each command's -h (newFlags).
type command struct {
	// name is the word on the command line.
	name string
	// args is the synopsis of the flags, e.g. "--config FILE [--key N]".
	args string
	// summary says in one line what the command does (more lines are indented).
	summary string
	// run runs the command with the arguments after its name; nil for a group.
	run func(ctx context.Context, c cmdIO, args []string) error
	// sub are a group's subcommands.
	sub []*command
	// noFlags marks a command that takes no flags (help prints no flag list).
	noFlags bool

	parent *command
}

// cmdIO is what a command may read and write.
type cmdIO struct {
	stdin          io.Reader
	stdout, stderr io.Writer
}

// root is the command table, built in init: its run functions use newFlags, which
// looks commands up in it.
var root *command

func init() {
	root = table()
	link(root)
}

// table returns the command table.
func table() *command {
	return &command{
		name:    "hwkms",
		summary: "Kubernetes KMS v2 plugin with the KEK in an HSM or TPM",
		sub: []*command{
			{name: "serve", args: "--config FILE", summary: "serve KMS v2 on the configured unix socket",
				run: func(ctx context.Context, c cmdIO, args []string) error { return cmdServe(ctx, args, c.stderr) }},
			{name: "dev", args: "[--backend pkcs11|tpm] [--socket PATH] [--dir DIR]", summary: "throwaway SoftHSM2 token or swtpm and KEK, served until Ctrl-C",
				run: func(ctx context.Context, c cmdIO, args []string) error { return cmdDev(ctx, args, c.stdout, c.stderr) }},
			{name: "key", summary: "create, list, rotate, destroy, import and replicate KEKs", sub: []*command{
				{name: "create", args: "--config FILE [--key N] [--backend pkcs11|tpm] [--replicable [--wrap-with-trusted]]",
					summary: "create keys[N] (default 0) on its device, print its key_id; refuses to overwrite an existing key;\n" +
						"--replicable: a PKCS#11 KEK key replicate can copy (sensitive, extractable only by wrapping)",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdKeyCreate(ctx, args, c.stdout, c.stderr)
					}},
				{name: "create", args: "--backend tpm --import-for a.pub,... --out-dir DIR [...]", summary: "same as tpm provision (docs/ha.md)"},
				{name: "list", args: "--config FILE", summary: "list configured keys: key_id, backend, role, present",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdKeyList(ctx, args, c.stdout, c.stderr)
					}},
				{name: "rotate", args: "--config FILE [--apply [--migrate [-- STORAGE-MIGRATE-FLAGS]]]", summary: "create a new primary key on the primary's device; print or write the config,\n" +
					"then print (or, with --migrate, run) the storage migrate that moves stored objects to it",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdKeyRotate(ctx, args, c.stdout, c.stderr)
					}},
				{name: "destroy", args: "--config FILE --key-id ID", summary: "destroy a key that is no longer in the config (asks to confirm)",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdKeyDestroy(ctx, args, c.stdin, c.stdout, c.stderr)
					}},
				{name: "import", args: "--device D --blob node.import (--blob-file PATH | --handle 0x81010010)",
					summary: "TPM2_Import the blob under this TPM's SRK; the result is an ordinary hwkms KEK for tpm.blobFile/persistentHandle",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdKeyImport(ctx, args, c.stdout, c.stderr)
					}},
				{name: "replicate", args: "--config FILE [--key N] --to-config FILE [--to-key M]",
					summary: "PKCS#11: copy keys[N]'s key to the token of the other config's keys[M] (C_WrapKey/C_UnwrapKey)",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdKeyReplicate(ctx, args, c.stdout, c.stderr)
					}},
			}},
			{name: "doctor", args: "--config FILE [--timeout D]", summary: "check module, token, PIN, keys, TPM, socket; exit 0 if safe to start",
				run: func(ctx context.Context, c cmdIO, args []string) error {
					return cmdDoctor(ctx, args, c.stdout, c.stderr)
				}},
			{name: "status", args: "--socket PATH [--timeout D]", summary: "call Status on a KMS v2 socket and print it",
				run: func(ctx context.Context, c cmdIO, args []string) error {
					return cmdStatus(ctx, args, c.stdout, c.stderr)
				}},
			{name: "bench", args: "--socket PATH [--op encrypt|decrypt|status|mixed] [--concurrency 1,8,64]\n" +
				"[--duration 5s | --ops N] [--distinct N] [--conns one|per-worker] [--pid PID] [--json]",
				summary: "load-test any KMS v2 plugin; verifies every Decrypt",
				run: func(ctx context.Context, c cmdIO, args []string) error {
					return cmdBench(ctx, args, c.stdout, c.stderr)
				}},
			{name: "tpm", summary: "several nodes, one TPM KEK (docs/ha.md)", sub: []*command{
				{name: "export-srk", args: "--device D [--out FILE] [--ek]",
					summary: "print this TPM's owner SRK Name and write its public area (TPM2B_PUBLIC, PEM without --out)",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return cmdExportSRK(ctx, args, c.stdout, c.stderr)
					}},
				{name: "provision", args: "--import-for a.pub,b.pub,... --out-dir DIR [--escrow-pub escrow.pub] [--auth-file F] [--ek-roots F]",
					summary: "generate one KEK in memory (no TPM needed) and write DIR/<name>.import per SRK (+ DIR/escrow.import)",
					run: func(_ context.Context, c cmdIO, args []string) error {
						return cmdProvision(args, c.stdout, c.stderr, "tpm provision")
					}},
				{name: "escrow-keygen", args: "--out-key escrow.key --out-pub escrow.pub", summary: "make the offline escrow key pair",
					run: func(_ context.Context, c cmdIO, args []string) error {
						return cmdEscrowKeygen(args, c.stdout, c.stderr)
					}},
				{name: "recover", args: "--escrow-blob escrow.import --escrow-key escrow.key --import-for a.pub,... --out-dir DIR [--escrow-pub P]",
					summary: "rebuild the KEK from the escrow and write import blobs for new TPMs",
					run:     func(_ context.Context, c cmdIO, args []string) error { return cmdRecover(args, c.stdout, c.stderr) }},
			}},
			{name: "cluster-check", args: "--sockets a,b,c [--timeout D]",
				summary: "same key_id and healthy everywhere, and every node decrypts every other node's Encrypt",
				run: func(ctx context.Context, c cmdIO, args []string) error {
					return cmdClusterCheck(ctx, args, c.stdout, c.stderr)
				}},
			{name: "storage", summary: "what etcd holds under each provider and key_id (read only), and its migration to the current key", sub: []*command{
				{name: "audit", args: "--encryption-provider-config FILE --etcd-servers URLS [--etcd-cafile F --etcd-certfile F --etcd-keyfile F] [--etcd-prefix /registry] [--resource R,...] [--json]",
					summary: "count the objects stored per resource, provider and KMS v2 key_id (Range requests only)",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return runStorageAudit(ctx, args, c.stdout, c.stderr)
					}},
				{name: "migrate", args: "--encryption-provider-config FILE [--kubectl PATH] [--kubeconfig F] [--method auto|svm|replace] [--resource R,...]\n" +
					"[--etcd-servers URLS [--etcd-*] (--key-id ID | --socket PATH) [--retries N]] [--timeout D]",
					summary: "rewrite every object of every configured resource under the current key: a StorageVersionMigration per\n" +
						"resource where the API server serves storagemigration.k8s.io/v1, else kubectl get -o json | kubectl replace;\n" +
						"then audit etcd and report what is still under other key_ids (docs/rotation.md step 4)",
					run: func(ctx context.Context, c cmdIO, args []string) error {
						return runStorageMigrate(ctx, args, c.stdout, c.stderr)
					}},
			}},
			{name: "version", summary: "print the version, commit, Go version and the modules built in", noFlags: true,
				run: func(_ context.Context, c cmdIO, args []string) error { return cmdVersion(args, c.stdout, c.stderr) }},
			{name: "help", args: "[COMMAND...]", summary: "print this usage, or a command's usage and flags", noFlags: true, run: cmdHelp},
		},
	}
}

// link sets every command's parent.
func link(c *command) {
	for _, s := range c.sub {
		s.parent = c
		link(s)
	}
}

// path is the command's words after "hwkms", e.g. "key create".
func (c *command) path() string {
	if c.parent == nil {
		return ""
	}
	if p := c.parent.path(); p != "" {
		return p + " " + c.name
	}
	return c.name
}

// find returns the runnable subcommand name of c, or nil.
func (c *command) find(name string) *command {
	for _, s := range c.sub {
		if s.name == name && (s.run != nil || s.sub != nil) {
			return s
		}
	}
	return nil
}

// lookup returns the command at words ("key", "create") or nil.
func lookup(words []string) *command {
	c := root
	for _, w := range words {
		if c = c.find(w); c == nil {
			return nil
		}
	}
	return c
}

// dispatch runs the command args names below c.
func dispatch(ctx context.Context, c *command, args []string, o cmdIO) error {
	if len(args) == 0 {
		writeUsage(o.stderr, c)
		return exitError(2)
	}
	if c == root && (args[0] == "-h" || args[0] == "--help") {
		writeUsage(o.stdout, root)
		return nil
	}
	s := c.find(args[0])
	if s == nil {
		what := "command"
		if c != root {
			what = c.path() + " command"
		}
		fmt.Fprintf(o.stderr, "unknown %s %q\n\n", what, args[0])
		writeUsage(o.stderr, c)
		return exitError(2)
	}
	if s.run == nil {
		return dispatch(ctx, s, args[1:], o)
	}
	return s.run(ctx, o, args[1:])
}

// cmdHelp prints the usage, or with arguments the help of one command: its usage line,
// summary and, by running it with -h, its flags.
func cmdHelp(ctx context.Context, o cmdIO, args []string) error {
	c := lookup(args)
	switch {
	case c == nil:
		fmt.Fprintf(o.stderr, "unknown command %q\n\n", strings.Join(args, " "))
		writeUsage(o.stderr, root)
		return exitError(2)
	case c.run == nil:
		writeUsage(o.stdout, c)
		return nil
	case c.noFlags:
		writeHelp(o.stdout, c)
		return nil
	}
	// Every command's FlagSet prints its help on -h (newFlags) and stops there.
	if err := c.run(ctx, cmdIO{stdin: strings.NewReader(""), stdout: o.stdout, stderr: o.stdout}, []string{"-h"}); !errors.Is(err, flag.ErrHelp) {
		return err
	}
	return nil
}

// writeUsage prints the usage of a group: every command below it, with its summary.
func writeUsage(w io.Writer, c *command) {
	if c == root {
		fmt.Fprintf(w, "hwkms: %s\n\n", root.summary)
	}
	fmt.Fprintln(w, "Usage:")
	var walk func(c *command)
	walk = func(c *command) {
		for _, s := range c.sub {
			if s.sub != nil {
				walk(s)
				continue
			}
			writeEntry(w, s)
		}
	}
	walk(c)
	if c == root {
		fmt.Fprint(w, `
Run "hwkms help COMMAND" (or "hwkms COMMAND -h") for a command's flags.

Secrets (PINs, auth values) are read from files or environment variables named in the
config, never from the command line.
`)
	}
}

// writeEntry prints one command's usage line(s) and its summary, indented.
func writeEntry(w io.Writer, c *command) {
	lines := strings.Split(c.args, "\n")
	fmt.Fprintf(w, "  hwkms %s", c.path())
	if lines[0] != "" {
		fmt.Fprintf(w, " %s", lines[0])
	}
	fmt.Fprintln(w)
	for _, l := range lines[1:] {
		fmt.Fprintf(w, "        %s\n", l)
	}
	for _, l := range strings.Split(c.summary, "\n") {
		fmt.Fprintf(w, "        %s\n", l)
	}
}

// writeHelp prints the help of one command (its -h before the flags): every usage
// line of its path in the table (key create has two) and the summaries.
func writeHelp(w io.Writer, c *command) {
	fmt.Fprintln(w, "Usage:")
	for _, s := range c.parent.sub {
		if s.name == c.name {
			writeEntry(w, s)
		}
	}
}
