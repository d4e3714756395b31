#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_level = -1; /* -1: not yet read from the environment */

static hx_log_level level_from_env(void)
{
    const char *s = getenv("HEXFLOW_LOG");
    if (!s)
        return HX_LOG_WARN;
    if (!strcmp(s, "error"))
        return HX_LOG_ERROR;
    if (!strcmp(s, "info"))
        return HX_LOG_INFO;
    if (!strcmp(s, "debug"))
        return HX_LOG_DEBUG;
    return HX_LOG_WARN;
}

void hx_log_set_level(hx_log_level level)
{
    g_level = (int)level;
}

hx_log_level hx_log_get_level(void)
{
    if (g_level < 0)
        g_level = (int)level_from_env();
    return (hx_log_level)g_level;
}

void hx_log(hx_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warning", "info", "debug"};
    if (level > hx_log_get_level())
        return;
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "hexflow: %s: %s\n", names[level], buf);
}
