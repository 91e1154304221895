package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"google.golang.org/protobuf/encoding/protojson"
	"gopkg.in/yaml.v3"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// readSpec reads a pair spec from file ("-": standard input): a lockstep.dev/v1 Pair, or, for
// one more release and with a warning, the old protobuf-JSON PairSpec in YAML or JSON. It
// returns the decoded Pair too (nil for the old format) so that the agent's refusals can be
// placed in the file.
func (a *app) readSpec(file string) (*pb.PairSpec, *pairspec.Pair, error) {
	var b []byte
	var err error
	if file == "-" {
		b, err = io.ReadAll(io.LimitReader(a.in, pairspec.MaxDocumentSize+1))
	} else {
		b, err = os.ReadFile(file)
	}
	if err != nil {
		return nil, nil, usagef("spec: %v", err)
	}
	name := file
	if file == "-" {
		name = "<stdin>"
	}
	if isLegacySpec(b) {
		spec, err := readLegacySpec(b)
		if err != nil {
			return nil, nil, &specError{file: name, err: err}
		}
		fmt.Fprintf(a.errOut, "lockstepctl: warning: %s is a spec in the old protobuf-JSON format, which a later release will refuse;\n"+
			"  \"lockstepctl convert -f %s\" prints it as a %s Pair\n", name, file, pairspec.APIVersion)
		return spec, nil, nil
	}
	p, err := pairspec.Decode(b)
	if err != nil {
		return nil, nil, &specError{file: name, err: err}
	}
	return p.ToProto(), p, nil
}

// isLegacySpec reports whether b is a spec in the old format: a mapping with a name at the top
// and neither apiVersion nor kind.
func isLegacySpec(b []byte) bool {
	var top map[string]any
	if yaml.Unmarshal(b, &top) != nil {
		return false
	}
	_, api := top["apiVersion"]
	_, kind := top["kind"]
	_, name := top["name"]
	return name && !api && !kind
}

// readLegacySpec reads the old format: a PairSpec in protobuf JSON, written in YAML or JSON.
func readLegacySpec(b []byte) (*pb.PairSpec, error) {
	var v any
	if err := yaml.Unmarshal(b, &v); err != nil {
		return nil, err
	}
	js, err := json.Marshal(jsonable(v))
	if err != nil {
		return nil, err
	}
	spec := &pb.PairSpec{}
	if err := protojson.Unmarshal(js, spec); err != nil {
		return nil, err
	}
	return spec, nil
}

// jsonable turns YAML's map[string]any trees into JSON-encodable values.
func jsonable(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			x[k] = jsonable(e)
		}
		return x
	case map[any]any:
		m := map[string]any{}
		for k, e := range x {
			m[fmt.Sprint(k)] = jsonable(e)
		}
		return m
	case []any:
		for i, e := range x {
			x[i] = jsonable(e)
		}
	}
	return v
}
