// Package structure holds tests that guard the repository's layout: every
// package has a doc comment, and the public SDK stays free of server code.
package structure
