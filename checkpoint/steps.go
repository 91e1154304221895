package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Step is one named QMP action of a sequence, with its own deadline.
type Step struct {
	Name    string
	Timeout time.Duration
	Run     func(ctx context.Context) error
}

// Sequence is a named, ordered list of steps.
type Sequence struct {
	Name  string
	Steps []Step
	// Finally, when set, runs once after the steps, whatever their outcome.
	Finally func()
	// KeepGoing runs every step even after one fails (clean-up sequences: what one failed step
	// leaves behind must not stop the others from being removed); the error names the first
	// failed step and counts the others.
	KeepGoing bool
}

// StepPhase says where a step is.
type StepPhase string

// Step phases reported to a Progress function.
const (
	StepStarted StepPhase = "started"
	StepDone    StepPhase = "done"
	StepFailed  StepPhase = "failed"
)

// StepEvent reports the progress of one step.
type StepEvent struct {
	Sequence string
	Step     string
	Index    int // 1-based
	Total    int
	Phase    StepPhase
	Elapsed  time.Duration // of the step, for done and failed
	Err      error
}

// Progress receives step events; it must not block.
type Progress func(StepEvent)

// StepError names the sequence and the step that failed, and wraps QEMU's answer.
type StepError struct {
	Sequence string
	Step     string
	Err      error
}

func (e *StepError) Error() string {
	return fmt.Sprintf("%s: step %q: %v", e.Sequence, e.Step, e.Err)
}

func (e *StepError) Unwrap() error { return e.Err }

// DefaultStepTimeout bounds a step that sets no timeout of its own.
const DefaultStepTimeout = 5 * time.Second

// Run executes the steps in order, logging each by name, and stops at the first failure (or,
// with KeepGoing, goes on and reports the first). It returns the total time taken.
func (q Sequence) Run(ctx context.Context, log *slog.Logger, progress Progress) (time.Duration, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if progress == nil {
		progress = func(StepEvent) {}
	}
	if q.Finally != nil {
		defer q.Finally()
	}
	start := time.Now()
	var first *StepError
	failed := 0
	for i, st := range q.Steps {
		ev := StepEvent{Sequence: q.Name, Step: st.Name, Index: i + 1, Total: len(q.Steps)}
		ev.Phase = StepStarted
		progress(ev)
		timeout := st.Timeout
		if timeout == 0 {
			timeout = DefaultStepTimeout
		}
		sctx, cancel := context.WithTimeout(ctx, timeout)
		t0 := time.Now()
		err := st.Run(sctx)
		cancel()
		ev.Elapsed = time.Since(t0)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				err = fmt.Errorf("no answer within %v: %w", timeout, err)
			}
			ev.Phase, ev.Err = StepFailed, err
			progress(ev)
			log.Error("step failed", "sequence", q.Name, "step", st.Name, "n", i+1, "of", len(q.Steps), "elapsed", ev.Elapsed, "err", err)
			se := &StepError{Sequence: q.Name, Step: st.Name, Err: err}
			if !q.KeepGoing || ctx.Err() != nil {
				return time.Since(start), se
			}
			if first == nil {
				first = se
			}
			failed++
			continue
		}
		ev.Phase = StepDone
		progress(ev)
		log.Info("step done", "sequence", q.Name, "step", st.Name, "n", i+1, "of", len(q.Steps), "elapsed", ev.Elapsed)
	}
	if first != nil {
		if failed > 1 {
			first.Err = fmt.Errorf("%w (and %d more steps failed)", first.Err, failed-1)
		}
		return time.Since(start), first
	}
	return time.Since(start), nil
}

// StepNames lists the names of the steps, for status and tests.
func (q Sequence) StepNames() []string {
	out := make([]string, len(q.Steps))
	for i, s := range q.Steps {
		out[i] = s.Name
	}
	return out
}

// InsertAfter inserts steps right after the step named name; an error if there is none.
func (q *Sequence) InsertAfter(name string, steps ...Step) error {
	for i, s := range q.Steps {
		if s.Name == name {
			q.Steps = append(q.Steps[:i+1], append(append([]Step(nil), steps...), q.Steps[i+1:]...)...)
			return nil
		}
	}
	return fmt.Errorf("sequence %s has no step %q", q.Name, name)
}

// Prepend puts steps before the first step; Append after the last.
func (q *Sequence) Prepend(steps ...Step) {
	q.Steps = append(append([]Step(nil), steps...), q.Steps...)
}

// Append adds steps after the last one.
func (q *Sequence) Append(steps ...Step) { q.Steps = append(q.Steps, steps...) }

// poll calls check every interval until it reports done, fails, or ctx ends; what says what is
// awaited, for the error.
func poll(ctx context.Context, interval time.Duration, what string, check func(ctx context.Context) (bool, error)) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		done, err := check(ctx)
		if err != nil || done {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		case <-tick.C:
		}
	}
}
