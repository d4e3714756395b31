/*
 * cmd_generate.h - `hexflow generate`: a single-process reference run of a
 * model on the CPU backend (see cli/cli.h for the subcommand conventions).
 */
#ifndef HX_CMD_GENERATE_H
#define HX_CMD_GENERATE_H

/* argv[0] is "generate". Returns the process exit status (0, 1 or 2). */
int hx_cmd_generate(int argc, char **argv);

#endif /* HX_CMD_GENERATE_H */
