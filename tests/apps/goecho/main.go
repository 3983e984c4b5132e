// goecho echoes every connection with io.Copy(conn, conn), which on Linux moves the bytes
// with splice(2) (socket to pipe, pipe to socket), then half-closes after the client's end
// of stream. It prints "ready" once it listens.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: goecho ADDR")
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	for {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go func(c *net.TCPConn) {
			defer c.Close()
			if _, err := io.Copy(c, c); err != nil {
				// A broken echo must never look complete: reset rather than FIN.
				c.SetLinger(0)
				return
			}
			c.CloseWrite()
			io.Copy(io.Discard, c)
		}(conn.(*net.TCPConn))
	}
}
