package coord

import (
	"context"
	"log/slog"
	"slices"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// newZapLogger gives etcd (client or embedded server) a zap logger that forwards only errors to
// our slog logger: etcd logs every connection attempt and election at info/warn level, which
// would drown the agent's own log while the store is down, and the agent reports "store
// unreachable" itself.
func newZapLogger(log *slog.Logger) *zap.Logger {
	return newZapLoggerClosing(log, nil)
}

// newZapLoggerClosing is newZapLogger, silent once closing is set: an embedded server being
// closed reports each of its listeners' ends as an error ("setting up serving ... failed").
func newZapLoggerClosing(log *slog.Logger, closing *atomic.Bool) *zap.Logger {
	if log == nil {
		return zap.NewNop()
	}
	return zap.New(slogCore{log: log.With("component", "etcd"), closing: closing})
}

// slogCore is a zapcore.Core writing error-level entries to slog.
type slogCore struct {
	log     *slog.Logger
	fields  []zapcore.Field
	closing *atomic.Bool
}

// Enabled passes errors and worse only: see newZapLogger.
func (c slogCore) Enabled(l zapcore.Level) bool { return l >= zapcore.ErrorLevel }

// With keeps the fields for every later entry, as zap cores must.
func (c slogCore) With(fs []zapcore.Field) zapcore.Core {
	return slogCore{log: c.log, fields: append(slices.Clip(c.fields), fs...), closing: c.closing}
}

// Check adds this core for the entries Enabled lets through.
func (c slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

// Write turns the entry into one slog record; field order is lost, which slog readers do not
// depend on.
func (c slogCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	if c.closing != nil && c.closing.Load() {
		return nil
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fs {
		f.AddTo(enc)
	}
	attrs := make([]slog.Attr, 0, len(enc.Fields)+1)
	if e.LoggerName != "" {
		attrs = append(attrs, slog.String("logger", e.LoggerName))
	}
	for k, v := range enc.Fields {
		attrs = append(attrs, slog.Any(k, v))
	}
	c.log.LogAttrs(context.Background(), slog.LevelError, e.Message, attrs...)
	return nil
}

// Sync has nothing to flush: slog handlers write synchronously.
func (c slogCore) Sync() error { return nil }
