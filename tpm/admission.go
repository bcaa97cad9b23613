package tpm

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/hwkms/hwkms/plugin/kek"
)

// ErrWouldMissDeadline is wrapped (together with kek.ErrUnavailable) by a call
// refused at once because the calls queued before it on the TPM would take longer
// than its ctx allows (admission).
var ErrWouldMissDeadline = errors.New("tpm: call would not finish before its deadline")

// admission decides whether a call can finish before its deadline before it queues
// for the TPM. A TPM runs one command at a time, so a call waits for every call ahead
// of it: when (calls ahead + 1) x the observed time of one call exceeds the time left
// before the call's deadline, the call is answered with ErrWouldMissDeadline (and
// kek.ErrUnavailable, which the plugin answers as gRPC Unavailable) at once, instead
// of holding a place in the queue and timing out at its deadline. Under a burst that
// the TPM cannot serve in time (a kube-apiserver restart decrypting every DEK seed at
// once), the calls that can finish do, the others fail fast and are retried by their
// client, and none spends its whole deadline waiting for nothing.
//
// The observed time is an exponentially weighted mean (weight 1/8, each observation
// capped at twice the mean) of the time the semaphore was held by calls that did not
// reconnect. Until a call has been observed,
// every call is admitted. One admission is shared by every KEK on one semaphore (a
// line, or a KEK of its own on /dev/tpmrm*).
type admission struct {
	queued atomic.Int64 // calls waiting for or holding the semaphore
	meanNs atomic.Int64 // observed time of one call, ns; 0 before the first
	off    atomic.Bool  // Config.DisableAdmission
}

// enter counts a call in and returns how many were queued before it; leave must
// follow.
func (a *admission) enter() int64 { return a.queued.Add(1) - 1 }

func (a *admission) leave() { a.queued.Add(-1) }

// check refuses the call if ahead calls of the observed duration, then this one,
// cannot finish before ctx's deadline. A ctx already done gives its error (with
// kek.ErrUnavailable), admission on or off. On arrival (atTurn false) a refusal wraps
// ErrWouldMissDeadline and kek.ErrUnavailable: the client may retry at once,
// elsewhere or later. At its turn, with the TPM held (atTurn true), the call has
// spent its deadline waiting and a refusal also wraps context.DeadlineExceeded: it
// is answered as the timeout it is, without sending a command the deadline would
// cut off.
func (a *admission) check(ctx context.Context, ahead int64, atTurn bool) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("waiting for the TPM: %w: %w", kek.ErrUnavailable, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		return nil
	}
	left := time.Until(deadline)
	if left <= 0 {
		return fmt.Errorf("waiting for the TPM: %w: %w", kek.ErrUnavailable, context.DeadlineExceeded)
	}
	mean := time.Duration(a.meanNs.Load())
	if a.off.Load() || mean <= 0 {
		return nil
	}
	est := time.Duration(ahead+1) * mean
	if est <= left {
		return nil
	}
	err := fmt.Errorf("%w: %w: %d calls ahead at ~%v each, %v left",
		kek.ErrUnavailable, ErrWouldMissDeadline, ahead, mean.Round(10*time.Microsecond), left.Round(time.Millisecond))
	if atTurn {
		err = fmt.Errorf("%w: %w", err, context.DeadlineExceeded)
	}
	return err
}

// observe folds the time one call held the semaphore into the mean. One
// observation counts as at most twice the mean, so that a single stall (a GC pause,
// a descheduled thread) raises the estimate by at most 1/8 rather than refusing a
// deep queue that would have made it; a lasting slowdown still raises it within a
// few dozen calls.
func (a *admission) observe(d time.Duration) {
	for {
		old := a.meanNs.Load()
		next := int64(d)
		if old > 0 {
			next = old + (min(int64(d), 2*old)-old)/8
		}
		if a.meanNs.CompareAndSwap(old, next) {
			return
		}
	}
}
