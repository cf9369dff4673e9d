// Package proto holds courier's wire protocol definitions. The generated Go
// code is in proto/courier/v1 and is committed.
package proto

// Requires protoc (Debian: protobuf-compiler) and
// protoc-gen-go (go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12).
//go:generate protoc --go_out=. --go_opt=paths=source_relative courier/v1/courier.proto
