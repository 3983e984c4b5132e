// flyapp is a TCP app as Fly's guide deploys one: it listens on $PORT (on the address given
// as its argument, every address without one), says so on stdout, and answers each line a
// client sends with the same line in upper case. A line "exit" makes it exit with status 3,
// as a crashing app would.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
)

func main() {
	host := ""
	if len(os.Args) > 1 {
		host = os.Args[1]
	}
	addr := net.JoinHostPort(host, os.Getenv("PORT"))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening on %s (APP_MESSAGE=%s)\n", addr, os.Getenv("APP_MESSAGE"))
	for {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go serve(conn)
	}
}

func serve(c net.Conn) {
	defer c.Close()
	lines := bufio.NewScanner(c)
	for lines.Scan() {
		line := lines.Text()
		if line == "exit" {
			fmt.Println("exiting as asked")
			os.Exit(3)
		}
		if _, err := fmt.Fprintln(c, strings.ToUpper(line)); err != nil {
			return
		}
	}
}
