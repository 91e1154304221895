package pairspec

import (
	"bytes"
	"encoding/json"
	"io"

	"gopkg.in/yaml.v3"
)

// EncodeYAML writes v (a Pair, a PairList, a Status or any value of this package's types) as
// YAML with two-space indentation, in the format Decode reads.
func EncodeYAML(w io.Writer, v any) error {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return err
	}
	if err := enc.Close(); err != nil {
		return err
	}
	_, err := w.Write(buf.Bytes())
	return err
}

// EncodeJSON writes v as indented JSON, in the format Decode reads.
func EncodeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// NewList wraps pairs in a PairList.
func NewList(pairs []Pair) *PairList {
	if pairs == nil {
		pairs = []Pair{}
	}
	return &PairList{APIVersion: APIVersion, Kind: KindPairList, Items: pairs}
}
