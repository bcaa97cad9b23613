package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/hwkms/hwkms/cmd/internal/benchrow"
)

// benchResult is one concurrency level of `hwkms bench` (shared with cmd/benchtable).
type benchResult = benchrow.Row

type benchOpts struct {
	socket   string
	op       string
	levels   []int
	duration time.Duration
	ops      int
	distinct int
	perConn  bool
	pid      int
	timeout  time.Duration
}

// cmdBench is a KMS v2 load generator. It speaks only the KMS v2 API, so it works
// against any plugin.
func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench", stderr)
	var o benchOpts
	fs.StringVar(&o.socket, "socket", "", "path of the KMS v2 unix socket (required)")
	fs.StringVar(&o.op, "op", "mixed", "encrypt, decrypt, status or mixed (80% decrypt, 10% encrypt, 10% status)")
	levels := fs.String("concurrency", "1,8,64", "comma-separated concurrency levels")
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "time per level (ignored with --ops)")
	fs.IntVar(&o.ops, "ops", 0, "operations per level instead of --duration")
	fs.IntVar(&o.distinct, "distinct", 256, "decrypt: number of distinct ciphertexts, made before the level starts (a restart storm: --distinct 5000 --ops 5000)")
	conns := fs.String("conns", "one", "one: all workers share one connection; per-worker: one connection each")
	fs.IntVar(&o.pid, "pid", 0, "PID of the plugin, to report its peak RSS (VmHWM)")
	fs.DurationVar(&o.timeout, "timeout", 3*time.Second, "deadline of each request (the apiserver's default)")
	asJSON := fs.Bool("json", false, "print JSON lines instead of a table")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if o.socket == "" {
		return errors.New("bench: --socket is required")
	}
	switch o.op {
	case "encrypt", "decrypt", "status", "mixed":
	default:
		return fmt.Errorf("bench: --op %q: want encrypt, decrypt, status or mixed", o.op)
	}
	switch *conns {
	case "one":
	case "per-worker":
		o.perConn = true
	default:
		return fmt.Errorf("bench: --conns %q: want one or per-worker", *conns)
	}
	for _, f := range strings.Split(*levels, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 4096 {
			return fmt.Errorf("bench: --concurrency %q: want positive integers", *levels)
		}
		o.levels = append(o.levels, n)
	}
	if o.distinct < 1 {
		return errors.New("bench: --distinct must be at least 1")
	}
	var results []benchResult
	for _, c := range o.levels {
		r, err := benchLevel(ctx, o, c)
		if err != nil {
			return fmt.Errorf("bench: concurrency %d: %w", c, err)
		}
		results = append(results, r)
		if *asJSON {
			b, _ := json.Marshal(r)
			fmt.Fprintln(stdout, string(b))
		}
	}
	if !*asJSON {
		printBench(stdout, results)
	}
	for _, r := range results {
		if r.Errors > 0 {
			return exitError(1)
		}
	}
	return nil
}

func printBench(w io.Writer, rs []benchResult) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "op\tconc\tcount\terrors\tops/s\tp50\tp90\tp99\tmax\tpeak RSS\t")
	for _, r := range rs {
		rss := "-"
		if r.ServerPeakRSSKiB > 0 {
			rss = fmt.Sprintf("%.1f MiB", float64(r.ServerPeakRSSKiB)/1024)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.0f\t%s\t%s\t%s\t%s\t%s\t\n", r.Op, r.Concurrency, r.Count, r.Errors, r.OpsPerSec,
			us(r.P50us), us(r.P90us), us(r.P99us), us(r.MaxUs), rss)
	}
	tw.Flush()
	for _, r := range rs {
		if r.FirstError != "" {
			fmt.Fprintf(w, "concurrency %d: first error: %s\n", r.Concurrency, r.FirstError)
		}
	}
}

func us(v float64) string {
	if v >= 1000 {
		return fmt.Sprintf("%.2fms", v/1000)
	}
	return fmt.Sprintf("%.0fus", v)
}

type benchSample struct {
	ct, pt      []byte
	keyID       string
	annotations map[string][]byte // returned by Encrypt, sent back with Decrypt (KMS v2 contract)
}

// dialKMS returns a client of the KMS v2 socket at path, relative or absolute (a
// "unix://" target takes only an absolute path: "unix://./x" would name an authority).
func dialKMS(socket string) (*grpc.ClientConn, kmsapi.KeyManagementServiceClient, error) {
	abs, err := filepath.Abs(socket)
	if err != nil {
		return nil, nil, err
	}
	conn, err := grpc.NewClient("unix://"+abs, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	return conn, kmsapi.NewKeyManagementServiceClient(conn), nil
}

func benchLevel(ctx context.Context, o benchOpts, conc int) (benchResult, error) {
	res := benchResult{Op: o.op, Concurrency: conc}
	nconn := 1
	if o.perConn {
		nconn = conc
	}
	clients := make([]kmsapi.KeyManagementServiceClient, nconn)
	for i := range clients {
		conn, c, err := dialKMS(o.socket)
		if err != nil {
			return res, err
		}
		defer conn.Close()
		clients[i] = c
	}
	// Ciphertexts to decrypt, made before timing starts.
	var samples []benchSample
	if o.op == "decrypt" || o.op == "mixed" {
		var err error
		if samples, err = makeSamples(ctx, clients[0], o.distinct, o.timeout); err != nil {
			return res, err
		}
	}
	var (
		mu       sync.Mutex
		lat      []time.Duration
		errs     int
		deadline int // errs answered DeadlineExceeded
		unavail  int // errs answered Unavailable
		firstErr string
		next     int // next sample index, for decrypt
		done     int
	)
	take := func() (int, bool) { // claims one op; false when the level is over
		mu.Lock()
		defer mu.Unlock()
		if o.ops > 0 && done >= o.ops {
			return 0, false
		}
		done++
		i := next
		next++
		return i, true
	}
	lctx, cancel := context.WithCancel(ctx)
	if o.ops == 0 {
		lctx, cancel = context.WithTimeout(ctx, o.duration)
	}
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for w := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := clients[w%nconn]
			local := make([]time.Duration, 0, 1024)
			rng := mrand.New(mrand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for lctx.Err() == nil {
				i, ok := take()
				if !ok {
					break
				}
				op := o.op
				if op == "mixed" {
					switch r := rng.IntN(10); {
					case r == 0:
						op = "encrypt"
					case r == 1:
						op = "status"
					default:
						op = "decrypt"
					}
				}
				// Requests run to completion under their own deadline even when the
				// level's time is up; the loop checks the level between requests.
				t0 := time.Now()
				err := benchOne(ctx, c, op, samples, i, o.timeout)
				d := time.Since(t0)
				if err != nil {
					mu.Lock()
					errs++
					switch status.Code(err) {
					case codes.DeadlineExceeded:
						deadline++
					case codes.Unavailable:
						unavail++
					}
					if firstErr == "" {
						firstErr = fmt.Sprintf("%s: %v", op, err)
					}
					mu.Unlock()
					continue
				}
				local = append(local, d)
			}
			mu.Lock()
			lat = append(lat, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	slices.Sort(lat)
	res.Count, res.Errors, res.FirstError = len(lat), errs, firstErr
	res.DeadlineExceeded, res.Unavailable = deadline, unavail
	res.Seconds = elapsed.Seconds()
	res.OpsPerSec = float64(len(lat)) / elapsed.Seconds()
	res.P50us, res.P90us, res.P99us = pct(lat, 0.50), pct(lat, 0.90), pct(lat, 0.99)
	if len(lat) > 0 {
		res.MaxUs = float64(lat[len(lat)-1]) / 1e3
	}
	if o.pid > 0 {
		res.ServerPeakRSSKiB = peakRSS(o.pid)
	}
	return res, nil
}

func benchOne(ctx context.Context, c kmsapi.KeyManagementServiceClient, op string, samples []benchSample, i int, timeout time.Duration) error {
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch op {
	case "status":
		st, err := c.Status(rctx, &kmsapi.StatusRequest{})
		if err != nil {
			return err
		}
		if st.Healthz != "ok" {
			return fmt.Errorf("healthz %q", st.Healthz)
		}
	case "encrypt":
		pt := make([]byte, 32)
		rand.Read(pt)
		enc, err := c.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "bench"})
		if err != nil {
			return err
		}
		if len(enc.Ciphertext) == 0 || enc.KeyId == "" {
			return errors.New("empty ciphertext or key_id")
		}
	case "decrypt":
		s := samples[i%len(samples)]
		dec, err := c.Decrypt(rctx, &kmsapi.DecryptRequest{Ciphertext: s.ct, KeyId: s.keyID, Annotations: s.annotations, Uid: "bench"})
		if err != nil {
			return err
		}
		if !bytes.Equal(dec.Plaintext, s.pt) {
			return errors.New("decrypt returned a different plaintext")
		}
	}
	return nil
}

func makeSamples(ctx context.Context, c kmsapi.KeyManagementServiceClient, n int, timeout time.Duration) ([]benchSample, error) {
	out := make([]benchSample, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	sem := make(chan struct{}, 8)
	for i := range out {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			rctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			pt := make([]byte, 32)
			rand.Read(pt)
			enc, err := c.Encrypt(rctx, &kmsapi.EncryptRequest{Plaintext: pt, Uid: "bench-setup"})
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("preparing ciphertexts: %w", err)
				}
				mu.Unlock()
				return
			}
			out[i] = benchSample{enc.Ciphertext, pt, enc.KeyId, enc.Annotations}
		}()
	}
	wg.Wait()
	return out, firstErr
}

// pct returns the q-quantile of sorted durations in microseconds (nearest rank).
func pct(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	i = max(0, min(i, len(sorted)-1))
	return float64(sorted[i]) / 1e3
}

// peakRSS reads VmHWM (KiB) of pid from /proc; 0 if unavailable.
func peakRSS(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}
