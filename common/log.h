/*
 * log.h - leveled logging to stderr.
 *
 * The level comes from HEXFLOW_LOG (error, warn, info, debug; default warn)
 * or hx_log_set_level(). Messages go to stderr as "hexflow: LEVEL: text".
 */
#ifndef HX_LOG_H
#define HX_LOG_H

typedef enum hx_log_level {
    HX_LOG_ERROR = 0,
    HX_LOG_WARN = 1,
    HX_LOG_INFO = 2,
    HX_LOG_DEBUG = 3
} hx_log_level;

void hx_log_set_level(hx_log_level level);
hx_log_level hx_log_get_level(void);
void hx_log(hx_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define HX_ERROR(...) hx_log(HX_LOG_ERROR, __VA_ARGS__)
#define HX_WARN(...) hx_log(HX_LOG_WARN, __VA_ARGS__)
#define HX_INFO(...) hx_log(HX_LOG_INFO, __VA_ARGS__)
#define HX_DEBUG(...) hx_log(HX_LOG_DEBUG, __VA_ARGS__)

#endif /* HX_LOG_H */
