/* SPDX-License-Identifier: GPL-2.0-only */
/* One console line per event, for the testbed's guest programs (workload.c, freemem.c). */
#ifndef SOFTPAGE_GUEST_SAY_H
#define SOFTPAGE_GUEST_SAY_H

#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (len < 0)
		return;
	if ((size_t)len > sizeof(line) - 2)
		len = sizeof(line) - 2;
	line[len++] = '\n';
	/* one write per line: the console log never interleaves half lines */
	if (write(STDOUT_FILENO, line, (size_t)len) < 0)
		return;
}

#endif
