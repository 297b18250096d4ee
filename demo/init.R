## The R side of forward's demo (Rserve --RS-source demo/init.R, in OCAP mode with `oob enable`).
##
## It is the OCAP example from Rserve's documentation: a client that connects gets one capability,
## `auth`; calling it with the right user and password returns `parseEval`, which evaluates text.
## On top of that, what R prints while it evaluates goes to the browser as out-of-band (OOB)
## messages, in the `list(stream, text)` form Rserve's own `console.oob` option uses, so the page
## shows output while R is still busy and the answer when it is done.
##
## parseEval runs any R code: this is a demo of the plumbing. A real application exposes only the
## functions it needs (see "In real applications" in Rserve's OCAP documentation).

library(Rserve)

demo.user <- Sys.getenv("FORWARD_DEMO_USER", "mike")
demo.password <- Sys.getenv("FORWARD_DEMO_PASSWORD", "mypwd")

## One OOB message to the browser. self.oobSend needs Rserve's `oob enable` setting.
send.output <- function(stream, text) {
  if (length(text)) self.oobSend(list(stream, paste(text, collapse = "\n")))
  invisible(NULL)
}

## Evaluates one top-level expression. Its printed output is collected with a sink and sent when
## the expression is done (also when it fails half-way); messages and warnings are sent the
## moment they are signalled, so a long loop that calls message() reports progress as it runs.
eval.one <- function(expr, print.visible) {
  out <- character()
  con <- textConnection("out", "w", local = TRUE)
  sink(con)
  on.exit({
    sink()
    close(con)
    send.output("console.out", out)
  })
  res <- withCallingHandlers(
    withVisible(eval(expr, .GlobalEnv)),
    message = function(m) {
      send.output("console.msg", sub("\n$", "", conditionMessage(m)))
      invokeRestart("muffleMessage")
    },
    warning = function(w) {
      send.output("console.err", paste("Warning:", conditionMessage(w)))
      invokeRestart("muffleWarning")
    }
  )
  # Like the R console, a visible value that is not the answer is printed.
  if (print.visible && res$visible) print(res$value)
  res$value
}

## parseEval as in Rserve's OCAP example, evaluating expression by expression: the answer is the value of the last
## one; an error (also a syntax error) is returned as the condition object, for the page to show.
parseEval <- function(s) {
  tryCatch({
    exprs <- parse(text = s)
    value <- NULL
    for (i in seq_along(exprs))
      value <- eval.one(exprs[[i]], print.visible = i < length(exprs))
    value
  }, error = function(e) e)
}

auth <- function(user, pass) {
  if (identical(user, demo.user) && identical(pass, demo.password))
    list(parseEval = ocap(parseEval))
  else
    "sorry, unauthorized!"
}

oc.init <- function() ocap(auth)
