#!/bin/bash
# sh.sh TAG 'command' : run in the shell.py testbed, print the output
d=/var/tmp/sp-libvirt/shell-$1; id=$(date +%s%N)
printf '%s' "$2" > $d/spool/$id.tmp && mv $d/spool/$id.tmp $d/spool/$id.cmd
for i in $(seq 900); do [ -f $d/$id.out ] && { cat $d/$id.out; exit 0; }; sleep 1; done; echo timeout
