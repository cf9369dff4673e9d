// Package bench is `courier bench`: load scenarios (conns, pairs, fanout,
// drain, storm) that measure a courier server over its real WebSocket
// protocol the way issue 4 specifies, and check every run for lost and
// duplicated messages.
//
// The load generator is deliberately light, so that the server, not the
// bench, is what gets measured: connections are non-blocking sockets on
// a few event loops of its own (loop.go: no goroutine and no buffers per
// idle connection, loops parked on Go's poller rather than blocking),
// spread over many 127.0.0.x source addresses and, past one process's file
// limit, over worker processes (RunWorker). By default the server under
// test is a child `courier serve` process on embedded defaults in a
// temporary directory, so that its memory and CPU figures (from /proc) are
// its own.
package bench
