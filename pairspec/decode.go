package pairspec

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// MaxDocumentSize bounds what Decode reads: a spec is a few hundred bytes.
const MaxDocumentSize = 1 << 20

// Decode reads one Pair document (YAML, or JSON, which is YAML too) strictly: an unknown or
// misspelt field, a value of the wrong kind or out of range, a missing required field, an
// alias or a second document is refused. Every refusal is a *FieldError naming the field and
// its line and column; all of them come back at once as Errors. The Pair's status, if any, is
// ignored. A Pair Decode accepts converts with ToProto into a PairSpec whose every field is
// within what the API documents.
func Decode(data []byte) (*Pair, error) {
	if len(data) > MaxDocumentSize {
		return nil, Errors{{Field: "(document)", Line: 1, Column: 1, Reason: fmt.Sprintf("%d bytes: a spec is at most %d", len(data), MaxDocumentSize)}}
	}
	root, err := parseDocument(data)
	if err != nil {
		return nil, err
	}
	d := newDecoder()
	p := &Pair{}
	d.value(root, "", reflect.ValueOf(p).Elem())
	// Validation reports what decoding did not already: a field whose value was refused
	// reads as unset, and "missing" would repeat the refusal.
	decoded := slices.Clone(d.errs)
	for _, e := range validate(p, d.at) {
		if !slices.ContainsFunc(decoded, func(de *FieldError) bool { return related(de.Field, e.Field) }) {
			d.errs = append(d.errs, e)
		}
	}
	if len(d.errs) > 0 {
		slices.SortStableFunc(d.errs, func(a, b *FieldError) int {
			if a.Line != b.Line {
				return a.Line - b.Line
			}
			return a.Column - b.Column
		})
		return nil, d.errs
	}
	p.at = d.at
	return p, nil
}

// parseDocument parses data into the root node of its only document.
func parseDocument(data []byte) (root *yaml.Node, err error) {
	defer func() {
		// The YAML parser is not ours; whatever it does with hostile input, a spec is refused,
		// never a crash.
		if r := recover(); r != nil {
			root, err = nil, Errors{{Field: "(document)", Line: 1, Column: 1, Reason: fmt.Sprintf("not YAML: %v", r)}}
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, Errors{{Field: "apiVersion", Line: 1, Column: 1, Reason: "empty document: want a Pair (apiVersion: " + APIVersion + ", kind: Pair)"}}
		}
		return nil, syntaxError(data, err)
	}
	var next yaml.Node
	if err := dec.Decode(&next); !errors.Is(err, io.EOF) {
		line := next.Line
		if err != nil {
			return nil, syntaxError(data, err)
		}
		return nil, Errors{{Field: "(document)", Line: max(line, 1), Column: 1, Reason: "a second document: give one Pair per file"}}
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, Errors{{Field: "(document)", Line: max(doc.Line, 1), Column: 1, Reason: "want a Pair: a mapping with apiVersion, kind, metadata and spec"}}
	}
	root = doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, Errors{{Field: "(document)", Line: root.Line, Column: root.Column, Reason: "want a Pair: a mapping with apiVersion, kind, metadata and spec"}}
	}
	return root, nil
}

var yamlLineRE = regexp.MustCompile(`line (\d+)`)

// syntaxError turns a YAML parser error into a FieldError that names the field whose value
// holds the error, as far as the lines before it tell.
func syntaxError(data []byte, err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 1
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		if n, cerr := strconv.Atoi(m[1]); cerr == nil && n > 0 {
			line = n
		}
		msg = strings.TrimSpace(strings.TrimPrefix(strings.Replace(msg, m[0], "", 1), ":"))
	}
	return Errors{{Field: fieldAtLine(data, line), Line: line, Column: 1, Reason: "not valid YAML: " + msg}}
}

var keyLineRE = regexp.MustCompile(`^(\s*)(?:-\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*:(\s*[^\s#].*)?\s*$`)

// fieldAtLine guesses, from indentation, the path of the field whose value holds line: the last
// key at or before it, where a key indented under one that has its value on its own line (vcpus:
// 1) is a broken continuation of that value, not a field of its own.
func fieldAtLine(data []byte, line int) string {
	type key struct {
		indent   int
		name     string
		hasValue bool
	}
	var stack []key
	for i, l := range strings.Split(string(data), "\n") {
		if i >= line {
			break
		}
		m := keyLineRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		indent := len(m[1])
		if n := len(stack); n > 0 && indent > stack[n-1].indent && stack[n-1].hasValue {
			continue
		}
		for len(stack) > 0 && stack[len(stack)-1].indent >= indent {
			stack = stack[:len(stack)-1]
		}
		stack = append(stack, key{indent, m[2], strings.TrimSpace(m[3]) != ""})
	}
	if len(stack) == 0 {
		return "(document)"
	}
	names := make([]string, len(stack))
	for i, k := range stack {
		names[i] = k.name
	}
	return strings.Join(names, ".")
}

// related reports whether one of two field paths is the other or holds it.
func related(a, b string) bool {
	within := func(x, y string) bool { return x == y || strings.HasPrefix(x, y+".") || strings.HasPrefix(x, y+"[") }
	return within(a, b) || within(b, a)
}

type pos struct{ line, col int }

// decoder fills Go values from YAML nodes, refusing what does not fit and remembering where
// each field was, so that validation can say where a bad value is.
type decoder struct {
	keyPos map[string]pos // where each field's key is
	valPos map[string]pos // where each field's value is
	errs   Errors
}

func newDecoder() *decoder {
	return &decoder{keyPos: map[string]pos{}, valPos: map[string]pos{}}
}

func (d *decoder) fail(field string, p pos, format string, a ...any) {
	d.errs = append(d.errs, &FieldError{Field: field, Line: p.line, Column: p.col, Reason: fmt.Sprintf(format, a...)})
}

// at is where to point for a refusal of field: its value, or for a missing field the key of
// its nearest parent that is there.
func (d *decoder) at(field string) (int, int) {
	if p, ok := d.valPos[field]; ok {
		return p.line, p.col
	}
	if p, ok := d.keyPos[field]; ok {
		return p.line, p.col
	}
	for f := field; f != ""; {
		i := strings.LastIndexAny(f, ".[")
		if i < 0 {
			break
		}
		f = f[:i]
		if p, ok := d.keyPos[f]; ok {
			return p.line, p.col
		}
	}
	return 1, 1
}

// scalarParser is a type written as one scalar in a spec.
type scalarParser interface {
	parseScalar(value, tag string) error
}

var scalarParserType = reflect.TypeFor[scalarParser]()

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	}
	switch n.Tag {
	case "!!int", "!!float":
		return "a number"
	case "!!bool":
		return "true or false"
	}
	return fmt.Sprintf("%q", n.Value)
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.Tag == "!!null" }

// plainTags are the tags a scalar may carry: YAML's own, resolved, or written out.
var plainTags = map[string]bool{"!!str": true, "!!int": true, "!!float": true, "!!bool": true, "!!null": true, "!!timestamp": true}

// value decodes n into v, at path.
func (d *decoder) value(n *yaml.Node, path string, v reflect.Value) {
	p := pos{n.Line, n.Column}
	if n.Kind == yaml.ScalarNode {
		d.valPos[path] = p // a mapping's or a list's refusals point at its key
	}
	if n.Kind == yaml.AliasNode {
		d.fail(path, p, "an alias (*%s): aliases are not taken in a spec; write the value out", n.Value)
		return
	}
	if n.Kind == yaml.ScalarNode && !plainTags[n.Tag] {
		d.fail(path, p, "tag %s: not taken in a spec", n.Tag)
		return
	}
	if isNull(n) {
		return // unset, as if left out
	}
	if v.CanAddr() && v.Addr().Type().Implements(scalarParserType) {
		if n.Kind != yaml.ScalarNode {
			d.fail(path, p, "got %s: want a single value", kindName(n))
			return
		}
		if err := v.Addr().Interface().(scalarParser).parseScalar(n.Value, n.Tag); err != nil {
			d.fail(path, p, "%v", err)
		}
		return
	}
	switch v.Kind() {
	case reflect.Pointer:
		nv := reflect.New(v.Type().Elem())
		d.value(n, path, nv.Elem())
		v.Set(nv)
	case reflect.Struct:
		d.mapping(n, path, v)
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			d.fail(path, p, "got %s: want a string", kindName(n))
			return
		}
		v.SetString(n.Value)
	case reflect.Bool:
		b, err := strconv.ParseBool(n.Value)
		if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" || err != nil {
			d.fail(path, p, "got %s: want true or false", kindName(n))
			return
		}
		v.SetBool(b)
	case reflect.Uint32, reflect.Uint64:
		if n.Kind != yaml.ScalarNode {
			d.fail(path, p, "got %s: want a whole number", kindName(n))
			return
		}
		u, err := strconv.ParseUint(n.Value, 10, v.Type().Bits())
		if err != nil {
			if ne := (*strconv.NumError)(nil); errors.As(err, &ne) && ne.Err == strconv.ErrRange {
				d.fail(path, p, "%s is too large", n.Value)
			} else {
				d.fail(path, p, "got %s: want a whole number", kindName(n))
			}
			return
		}
		v.SetUint(u)
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			d.fail(path, p, "got %s: want a list", kindName(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, e := range n.Content {
			d.value(e, fmt.Sprintf("%s[%d]", path, i), s.Index(i))
		}
		v.Set(s)
	default:
		d.fail(path, p, "cannot be set in a spec")
	}
}

type fieldInfo struct {
	index  []int
	ignore bool
}

// fieldsOf maps the YAML names of t's fields, inline ones included, to the fields.
func fieldsOf(t reflect.Type) (map[string]fieldInfo, []string) {
	m := map[string]fieldInfo{}
	var names []string
	var walk func(t reflect.Type, prefix []int)
	walk = func(t reflect.Type, prefix []int) {
		for i := range t.NumField() {
			f := t.Field(i)
			name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			idx := append(slices.Clone(prefix), i)
			if strings.Contains(opts, "inline") {
				walk(f.Type, idx)
				continue
			}
			if name == "" || name == "-" {
				continue
			}
			m[name] = fieldInfo{index: idx, ignore: f.Tag.Get("decode") == "ignore"}
			names = append(names, name)
		}
	}
	walk(t, nil)
	return m, names
}

// renamed are the fields of the old protobuf-JSON spec, with where they went.
var renamed = map[string]string{
	"memoryMib": "memory (with a unit: 512Mi)", "diskSizeBytes": "disk.size (with a unit: 64Gi)",
	"kernel": "boot.kernel", "initrd": "boot.initrd", "append": "boot.cmdline", "tunables": "checkpointDelay, compareTimeout, ... at the level of spec",
	"diskPath": "disk.path", "diskFormat": "disk.format", "maxBandwidthBytesPerSecond": "maxBandwidth (100Mi/s)",
	"noRewriter": "rewriter: false", "name": "metadata.name",
}

func (d *decoder) mapping(n *yaml.Node, path string, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		d.fail(path, pos{n.Line, n.Column}, "got %s: want a mapping", kindName(n))
		return
	}
	fields, names := fieldsOf(v.Type())
	seen := map[string]pos{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		kp := pos{k.Line, k.Column}
		if k.Kind != yaml.ScalarNode {
			d.fail(join(path, "?"), kp, "a key that is %s: keys are field names", kindName(k))
			continue
		}
		name := k.Value
		if strings.TrimSpace(name) == "" {
			name = strconv.Quote(name) // an empty key still has to be named
		}
		field := join(path, name)
		if prev, dup := seen[k.Value]; dup {
			d.fail(field, kp, "given twice (first on line %d)", prev.line)
			continue
		}
		seen[k.Value] = kp
		fi, ok := fields[k.Value]
		if !ok {
			d.fail(field, kp, "unknown field%s", hint(k.Value, names, path))
			continue
		}
		d.keyPos[field] = kp
		if fi.ignore {
			continue
		}
		d.value(val, field, v.FieldByIndex(fi.index))
	}
}

// hint suggests the field meant by an unknown name.
func hint(name string, names []string, path string) string {
	if to, ok := renamed[name]; ok && (path == "spec" || strings.HasPrefix(path, "spec.")) {
		return fmt.Sprintf(" (a field of the old format; in %s it is %s)", APIVersion, to)
	}
	best, bestD := "", 3
	for _, n := range names {
		if strings.EqualFold(n, name) {
			return fmt.Sprintf("; did you mean %s?", n)
		}
		if dd := levenshtein(strings.ToLower(n), strings.ToLower(name)); dd < bestD {
			best, bestD = n, dd
		}
	}
	if best != "" {
		return fmt.Sprintf("; did you mean %s?", best)
	}
	where := path
	if where == "" {
		where = "a Pair"
	}
	return fmt.Sprintf("; %s takes %s", where, strings.Join(names, ", "))
}
