// Package courierv1 is the Go code generated from courier.proto, courier's
// wire protocol version 1 (see docs/protocol.md). Do not edit
// courier.pb.go; regenerate it with `go generate ./proto/...`.
package courierv1
